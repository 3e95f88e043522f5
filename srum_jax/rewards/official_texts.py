"""The official texts, read from the user's checkouts by parsing their source with `ast` (never
importing or executing it): `import_texts(bagel, srum, reasonbench)` -> (`texts.Texts`, notes).

Where each text comes from (paths inside each checkout, `SOURCES`):

    BAGEL  inferencer.py                GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT (module
                                        strings)
    SRUM   srum_data_infer/vlm.py       create_global_layout_reward_prompt(prompt);
                                        create_hybrid_evaluation_prompt(prompt, objects): the block
                                        each object adds in its loop (or a join over them) and the
                                        text around the blocks
    SRUM   CompBench_eval/qwen_eval.py  main(): the `question_text` assignment
    T2I-ReasonBench (optional)
           evaluation/Qwen2.5-VL/eval_<dimension>.py
                                        eval(): `q1` (the describe turn) and each later `qN`, filed
                                        under the criterion group its placeholder variable reads

A string expression becomes a `str.format` template: literals (braces doubled), f-strings (each
replacement field a named placeholder, its conversion and format spec kept), `+` concatenation,
`"...".format(...)` calls, and names bound to such expressions in the module or the function. The
builder's prompt parameter becomes {prompt}, the region id {region_id}, the object's box
(`obj['bbox']`) {bbox}, the accumulated region text {regions}, the benchmark's criterion entry
{criteria}. Anything else (another call, an `if` in the region loop, a second placeholder where one
is expected, a missing function or variable) is a layout this reader does not know: a one-line
`LayoutChanged` error naming the file, the line and what was expected.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import pathlib
import re
import string
from typing import Dict, List, Optional, Tuple

from srum_jax.errors import UserFileNotFoundError, UserValueError
from srum_jax.rewards import texts as texts_lib

SOURCES = {
    "bagel_inferencer": ("--bagel_code", "inferencer.py"),
    "srum_vlm": ("--srum_code", "srum_data_infer/vlm.py"),
    "srum_compbench_eval": ("--srum_code", "CompBench_eval/qwen_eval.py"),
}
REASONBENCH_FILES = {"idiom_interpretation": "idiom", "textual_image_design": "textual_image",
                     "entity_reasoning": "entity", "scientific_reasoning": "scientific"}
REASONBENCH_PATH = "evaluation/Qwen2.5-VL/eval_{}.py"
# The inferencer copy SRUM's vlm.py imports: its system prompts are compared with BAGEL's (a note).
SRUM_INFERENCER_COPY = "srum_data_infer/inferencer.py"


class LayoutChanged(UserValueError):
  """An official file no longer has the layout this reader expects (one line: file, line, what)."""


@dataclasses.dataclass
class SourceFile:
  """One parsed official file: its path inside the checkout, the SHA-256 of its bytes, its AST."""
  rel: str
  sha256: str
  tree: ast.Module

  def fail(self, node: Optional[ast.AST], why: str) -> LayoutChanged:
    line = f":{node.lineno}" if node is not None and hasattr(node, "lineno") else ""
    return LayoutChanged(f"{self.rel}{line}: {why} (the official file's layout changed; this "
                         f"reader needs an update)")


def read_source(root: str, rel: str, flag: str) -> SourceFile:
  """Parse `root/rel` (its bytes hashed as they are on disk)."""
  base = pathlib.Path(root)
  if not base.is_dir():
    raise UserFileNotFoundError(f"{flag} {root!r} is not a directory")
  path = base / rel
  if not path.is_file():
    raise UserFileNotFoundError(f"{flag} {root}: no {rel} (is it a checkout of the right "
                                f"repository?)")
  data = path.read_bytes()
  try:
    tree = ast.parse(data.decode("utf-8"), filename=rel)
  except (SyntaxError, UnicodeDecodeError, ValueError) as e:
    raise LayoutChanged(f"{rel}: cannot be parsed as Python ({' '.join(str(e).split())})") from None
  return SourceFile(rel=rel, sha256=hashlib.sha256(data).hexdigest(), tree=tree)


# ------------------------------------------------------------------------------------------------
# String expressions -> templates.

def _escape(text: str) -> str:
  return text.replace("{", "{{").replace("}", "}}")


def ref_key(node: ast.AST) -> Optional[str]:
  """A name (`x`) or a constant-key subscript of a name (`x['k']`) as a lookup key, else None."""
  if isinstance(node, ast.Name):
    return node.id
  if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
      and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
    return f"{node.value.id}[{node.slice.value!r}]"
  return None


def _is_format_call(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "format")


def is_string_expression(node: ast.AST) -> bool:
  """Whether `node` is built from string literals: a literal, an f-string, `+` of them, or
  `"...".format(...)`."""
  if isinstance(node, ast.Constant):
    return isinstance(node.value, str)
  if isinstance(node, ast.JoinedStr):
    return True
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    return is_string_expression(node.left) or is_string_expression(node.right)
  return _is_format_call(node) and is_string_expression(node.func.value)


class Templater:
  """Turns string expressions of one source into templates. `placeholders`: lookup key ->
  placeholder name; `bound`: name -> the string expression it is bound to (module strings, the
  function's own string variables), inlined where the name is used."""

  def __init__(self, src: SourceFile, placeholders: Dict[str, str], bound: Dict[str, ast.AST],
               where: str):
    self.src, self.placeholders, self.bound, self.where = src, placeholders, bound, where
    self.used: List[str] = []
    self._depth = 0

  def template(self, node: ast.AST) -> str:
    """The `str.format` template of a string expression."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return _escape(node.value)
    if isinstance(node, ast.JoinedStr):
      return "".join(self.template(v) if isinstance(v, ast.Constant) else self._field(v)
                     for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
      return self.template(node.left) + self.template(node.right)
    if _is_format_call(node):
      return self._format_call(node)
    key = ref_key(node)
    if key is not None and key in self.placeholders:
      self.used.append(self.placeholders[key])
      return "{" + self.placeholders[key] + "}"
    if isinstance(node, ast.Name) and node.id in self.bound:
      return self._inline(node.id)
    raise self.src.fail(node, f"{self.where}: unexpected {type(node).__name__} {_short(node)!r} "
                              f"in a string expression")

  def text(self, node: ast.AST) -> str:
    """The plain string of an expression without placeholders."""
    t = self.template(node)
    if texts_lib.template_fields(t, self.where):
      raise self.src.fail(node, f"{self.where}: expected a plain string, found placeholders")
    return t.format()

  def _inline(self, name: str) -> str:
    self._depth += 1
    if self._depth > 20:
      raise self.src.fail(self.bound[name], f"{self.where}: {name} refers to itself")
    try:
      return self.template(self.bound[name])
    finally:
      self._depth -= 1

  def _field(self, fv: ast.FormattedValue) -> str:
    """One replacement field: a placeholder (conversion and spec kept) or a constant, formatted."""
    conv = "" if fv.conversion == -1 else "!" + chr(fv.conversion)
    spec = "" if fv.format_spec is None else ":" + self.text(fv.format_spec)
    key = ref_key(fv.value)
    if key is not None and key in self.placeholders:
      self.used.append(self.placeholders[key])
      return "{" + self.placeholders[key] + conv + spec + "}"
    constant = isinstance(fv.value, ast.Constant) or (
        isinstance(fv.value, ast.Name) and fv.value.id in self.bound)
    if constant:
      return _escape(format(_convert(self.text(fv.value), conv), spec[1:]))
    raise self.src.fail(fv, f"{self.where}: unexpected replacement field {{{_short(fv.value)}}}")

  def _format_call(self, call: ast.Call) -> str:
    """`"<literal>".format(args)`: the literal's fields become the placeholders of their
    arguments."""
    receiver = self.text(call.func.value)
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None
                                                                 for k in call.keywords):
      raise self.src.fail(call, f"{self.where}: .format with *args / **kwargs")
    keywords = {k.arg: k.value for k in call.keywords}
    try:
      parsed = list(string.Formatter().parse(receiver))
    except ValueError as e:
      raise self.src.fail(call, f"{self.where}: .format on a malformed string ({e})") from None
    out, auto = [], 0
    for literal, name, spec, conv in parsed:
      out.append(_escape(literal))
      if name is None:
        continue
      if name == "":
        name, auto = str(auto), auto + 1
      if name.isdigit() and int(name) < len(call.args):
        arg = call.args[int(name)]
      elif name in keywords:
        arg = keywords[name]
      else:
        raise self.src.fail(call, f"{self.where}: .format field {{{name}}} has no plain argument")
      fv = ast.FormattedValue(value=arg, conversion=ord(conv) if conv else -1,
                              format_spec=ast.Constant(spec) if spec else None)
      out.append(self._field(ast.copy_location(fv, call)))
    return "".join(out)


def _convert(value: str, conv: str) -> object:
  return {"": value, "!s": str(value), "!r": repr(value), "!a": ascii(value)}[conv]


def _short(node: ast.AST) -> str:
  text = ast.unparse(node)
  return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------------
# Finding things in a module.

def _assigned_name(stmt: ast.AST) -> Optional[str]:
  """The target of `name = ...` (or `name: T = ...`), else None."""
  if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
    target = stmt.targets[0]
  elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
    target = stmt.target
  else:
    return None
  return target.id if isinstance(target, ast.Name) else None


def _string_bindings(body: List[ast.stmt]) -> Dict[str, ast.AST]:
  """`name = <string expression>` statements of a body (a later binding wins)."""
  return {_assigned_name(s): s.value for s in body
          if _assigned_name(s) is not None and is_string_expression(s.value)}


def module_strings(src: SourceFile) -> Dict[str, ast.AST]:
  """Module-level `NAME = <string expression>` bindings."""
  return _string_bindings(src.tree.body)


def module_string(src: SourceFile, name: str) -> str:
  """The module-level string constant `name`."""
  bound = module_strings(src)
  if name not in bound:
    raise src.fail(None, f"no module-level string {name}")
  return Templater(src, {}, bound, name).text(bound[name])


def function(src: SourceFile, name: str) -> ast.FunctionDef:
  """The one function definition called `name` in the module (at any depth)."""
  found = [n for n in ast.walk(src.tree)
           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
  if len(found) != 1:
    raise src.fail(found[1] if found else None,
                   f"expected one function {name}(), found {len(found)}")
  return found[0]


def _params(src: SourceFile, fn: ast.FunctionDef, count: int) -> List[str]:
  names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
  if len(names) < count:
    raise src.fail(fn, f"{fn.name}() takes {len(names)} parameters, expected at least {count}")
  return names[:count]


def _returned(src: SourceFile, fn: ast.FunctionDef) -> ast.AST:
  returns = [s for s in fn.body if isinstance(s, ast.Return)]
  if len(returns) != 1 or returns[0].value is None:
    raise src.fail(fn, f"{fn.name}() should end in one `return <string>`, found {len(returns)}")
  return returns[0].value


def _assignments(fn: ast.FunctionDef, name: str) -> List[ast.Assign]:
  """Every `name = ...` anywhere inside `fn` (loops and try blocks included)."""
  return [n for n in ast.walk(fn) if isinstance(n, ast.Assign) and _assigned_name(n) == name]


def _one_assignment(src: SourceFile, fn: ast.FunctionDef, name: str) -> ast.Assign:
  found = _assignments(fn, name)
  if len(found) != 1:
    raise src.fail(fn, f"expected one assignment to {name} in {fn.name}(), found {len(found)}")
  return found[0]


def _single_field_template(src: SourceFile, node: ast.AST, placeholder: str,
                           bound: Dict[str, ast.AST], where: str) -> Tuple[str, str]:
  """(template, the variable it reads) of an f-string that reads exactly one variable, which
  becomes {placeholder}."""
  keys: List[str] = []
  for n in ast.walk(node):
    key = ref_key(n.value) if isinstance(n, ast.FormattedValue) else None
    if key is not None and key not in bound and key not in keys:
      keys.append(key)
  if len(keys) != 1:
    raise src.fail(node, f"{where}: expected one replacement field, found {keys}")
  return Templater(src, {keys[0]: placeholder}, bound, where).template(node), keys[0]


# ------------------------------------------------------------------------------------------------
# SRUM's judge prompt builders.

def global_template(src: SourceFile) -> str:
  """`create_global_layout_reward_prompt(prompt)`'s returned text as a template."""
  fn = function(src, "create_global_layout_reward_prompt")
  (prompt,) = _params(src, fn, 1)
  bound = {**module_strings(src), **_string_bindings(fn.body)}
  return Templater(src, {prompt: "prompt"}, bound, fn.name).template(_returned(src, fn))


def region_templates(src: SourceFile) -> Tuple[str, str, str]:
  """(region template, block template, joiner) of `create_hybrid_evaluation_prompt(prompt,
  objects)`."""
  fn = function(src, "create_hybrid_evaluation_prompt")
  prompt, objects = _params(src, fn, 2)
  bound = module_strings(src)
  acc, block, joiner = None, None, ""
  for stmt in fn.body:
    if isinstance(stmt, ast.For):
      if acc is not None:
        raise src.fail(stmt, f"{fn.name}(): a second loop")
      acc, block = _accumulating_loop(src, fn, stmt, objects, bound)
  if acc is None:  # no loop: `acc = "<sep>".join(<block> for i, obj in enumerate(objects))`
    for stmt in fn.body:
      if _assigned_name(stmt) is not None and _is_join(stmt.value):
        if acc is not None:
          raise src.fail(stmt, f"{fn.name}(): two joins")
        acc = _assigned_name(stmt)
        block, joiner = _joined_blocks(src, fn, stmt.value, objects, bound)
  if acc is None:
    raise src.fail(fn, f"{fn.name}(): no loop over {objects} building the region text")
  t = Templater(src, {prompt: "prompt", acc: "regions"}, {**bound, **_string_bindings(fn.body)},
                fn.name)
  template = t.template(_returned(src, fn))
  if "regions" not in t.used:
    raise src.fail(fn, f"{fn.name}(): the returned text does not contain {acc}")
  return template, block, joiner


def _enumerated(src: SourceFile, fn: ast.FunctionDef, target: ast.AST, iterable: ast.AST,
                objects: str) -> Tuple[str, str, int]:
  """`for i, obj in enumerate(objects[, start=k])` -> (i, obj, k)."""
  call = iterable if isinstance(iterable, ast.Call) else None
  ok = (call is not None and isinstance(call.func, ast.Name) and call.func.id == "enumerate"
        and len(call.args) in (1, 2) and ref_key(call.args[0]) == objects
        and isinstance(target, ast.Tuple) and len(target.elts) == 2
        and all(isinstance(e, ast.Name) for e in target.elts))
  if not ok:
    raise src.fail(iterable, f"{fn.name}(): expected `for i, obj in enumerate({objects})`")
  start = call.args[1] if len(call.args) == 2 else next(
      (k.value for k in call.keywords if k.arg == "start"), ast.Constant(0))
  if not (isinstance(start, ast.Constant) and isinstance(start.value, int)):
    raise src.fail(iterable, f"{fn.name}(): enumerate's start is not a number")
  return target.elts[0].id, target.elts[1].id, start.value


def _block_fields(index: str, obj: str, start: int, offsets: Dict[str, int]) -> Dict[str, str]:
  """Placeholders of one region block: the id (the index, or a variable = index + c, whichever
  counts from 1) and the object's box."""
  fields = {f"{obj}['bbox']": "bbox"}
  for name, offset in [(index, 0), *offsets.items()]:
    if start + offset == 1:
      fields[name] = "region_id"
  return fields


def _block_template(src: SourceFile, fn: ast.FunctionDef, node: ast.AST, fields: Dict[str, str],
                    bound: Dict[str, ast.AST], obj: str) -> str:
  t = Templater(src, fields, bound, f"{fn.name}() region block")
  template = t.template(node)
  if set(t.used) != {"region_id", "bbox"}:
    raise src.fail(node, f"{fn.name}(): the region block should show the id (from 1) and "
                         f"{obj}['bbox']")
  return template


def _accumulating_loop(src: SourceFile, fn: ast.FunctionDef, loop: ast.For, objects: str,
                       bound: Dict[str, ast.AST]) -> Tuple[str, str]:
  """`acc = ""`, then `for i, obj in enumerate(objects): ...; acc += <block>` -> (acc, block)."""
  index, obj, start = _enumerated(src, fn, loop.target, loop.iter, objects)
  offsets, acc, block = {}, None, None
  for stmt in loop.body:
    value = getattr(stmt, "value", None)
    if (_assigned_name(stmt) is not None and isinstance(value, ast.BinOp)
        and isinstance(value.op, ast.Add) and ref_key(value.left) == index
        and isinstance(value.right, ast.Constant) and isinstance(value.right.value, int)):
      offsets[_assigned_name(stmt)] = value.right.value  # region_id = i + 1
    elif isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Subscript) for t in stmt.targets):
      continue  # writes into the caller's objects (the id kept for parsing): no text
    elif (isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add)
          and isinstance(stmt.target, ast.Name) and acc is None):
      acc, block = stmt.target.id, stmt.value
    else:
      raise src.fail(stmt, f"{fn.name}(): unexpected {type(stmt).__name__} in the region loop")
  if acc is None:
    raise src.fail(loop, f"{fn.name}(): the region loop adds no text (`<name> += ...`)")
  inits = [s for s in fn.body if _assigned_name(s) == acc]
  if len(inits) != 1 or not (isinstance(inits[0].value, ast.Constant)
                             and inits[0].value.value == ""):
    raise src.fail(loop, f"{fn.name}(): expected {acc} = \"\" before the region loop")
  fields = _block_fields(index, obj, start, offsets)
  if "region_id" not in fields.values():
    raise src.fail(loop, f"{fn.name}(): no region id counting from 1 in the loop")
  return acc, _block_template(src, fn, block, fields, bound, obj)


def _is_join(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "join" and isinstance(node.func.value, ast.Constant)
          and isinstance(node.func.value.value, str))


def _joined_blocks(src: SourceFile, fn: ast.FunctionDef, call: ast.Call, objects: str,
                   bound: Dict[str, ast.AST]) -> Tuple[str, str]:
  """`"<sep>".join(<block> for i, obj in enumerate(objects))` -> (block template, sep)."""
  comp = call.args[0] if len(call.args) == 1 else None
  if (not isinstance(comp, (ast.GeneratorExp, ast.ListComp)) or len(comp.generators) != 1
      or comp.generators[0].ifs):
    raise src.fail(call, f"{fn.name}(): expected a join over one `for ... in enumerate({objects})`")
  gen = comp.generators[0]
  index, obj, start = _enumerated(src, fn, gen.target, gen.iter, objects)
  block = _block_template(src, fn, comp.elt, _block_fields(index, obj, start, {}), bound, obj)
  return block, call.func.value.value


def box_format(src: SourceFile, block: str) -> str:
  """How the block writes the box: `str()` of the official list ("python_list"); a format spec on
  it is not something the stages can reproduce."""
  for _, name, spec, conv in string.Formatter().parse(block):
    if name == "bbox" and (spec or conv not in (None, "s", "r")):
      raise src.fail(None, f"the region block formats the box as {{bbox!{conv}:{spec}}}")
  return "python_list"


# ------------------------------------------------------------------------------------------------
# The evaluation questions.

def compbench_question(src: SourceFile) -> str:
  """The `question_text` f-string of SRUM's qwen_eval.py `main()`, its one field as {prompt}."""
  fn = function(src, "main")
  assign = _one_assignment(src, fn, "question_text")
  bound = {**module_strings(src), **_string_bindings(fn.body)}
  return _single_field_template(src, assign.value, "prompt", bound, "main() question_text")[0]


def reasonbench_protocol(src: SourceFile) -> Dict[str, object]:
  """{"describe": q1, "questions": {group: template}} of one `eval_<dimension>.py`."""
  fn = function(src, "eval")
  bound = {**module_strings(src), **_string_bindings(fn.body)}
  describe = Templater(src, {}, bound, "eval() q1").text(_one_assignment(src, fn, "q1").value)
  names = {_assigned_name(a) for a in ast.walk(fn) if isinstance(a, ast.Assign)}
  names = sorted((n for n in names if n and re.fullmatch(r"q([2-9]|\d\d+)", n)),
                 key=lambda s: int(s[1:]))
  if not names:
    raise src.fail(fn, "eval(): no second-turn questions q2, q3, ...")
  questions: Dict[str, str] = {}
  for name in names:
    template, var = _single_field_template(src, _one_assignment(src, fn, name).value, "criteria",
                                           bound, f"eval() {name}")
    read = _one_assignment(src, fn, var).value
    if not (isinstance(read, ast.Subscript) and isinstance(read.slice, ast.Constant)
            and isinstance(read.slice.value, str)):
      raise src.fail(read, f"eval(): {var} should read one criterion group, qs[...]['<group>']")
    if read.slice.value in questions:
      raise src.fail(read, f"eval(): two questions read {read.slice.value}")
    questions[read.slice.value] = template
  return {"describe": describe, "questions": questions}


# ------------------------------------------------------------------------------------------------
# Everything.

def import_texts(bagel_code: str, srum_code: str,
                 reasonbench_code: str = "") -> Tuple[texts_lib.Texts, List[str]]:
  """The official texts from the checkouts, checked; and notes for the user (one line each)."""
  roots = {"--bagel_code": bagel_code, "--srum_code": srum_code,
           "--reasonbench_code": reasonbench_code}
  files = {role: (flag, read_source(roots[flag], rel, flag))
           for role, (flag, rel) in SOURCES.items()}
  inferencer, vlm = files["bagel_inferencer"][1], files["srum_vlm"][1]
  gen_system = module_string(inferencer, "GEN_THINK_SYSTEM_PROMPT")
  judge_system = module_string(inferencer, "VLM_THINK_SYSTEM_PROMPT")
  notes = []
  if (pathlib.Path(srum_code) / SRUM_INFERENCER_COPY).is_file():
    copy = read_source(srum_code, SRUM_INFERENCER_COPY, "--srum_code")
    same = (module_string(copy, "GEN_THINK_SYSTEM_PROMPT") == gen_system
            and module_string(copy, "VLM_THINK_SYSTEM_PROMPT") == judge_system)
    files["srum_inferencer_copy"] = ("--srum_code", copy)
    notes.append(f"SRUM's {SRUM_INFERENCER_COPY} system prompts "
                 f"{'equal' if same else 'DIFFER FROM'} BAGEL's (BAGEL's are used)")
  region, block, joiner = region_templates(vlm)
  reasonbench: Dict[str, dict] = {}
  if reasonbench_code:
    for dim, stem in REASONBENCH_FILES.items():
      src = read_source(reasonbench_code, REASONBENCH_PATH.format(stem), "--reasonbench_code")
      files[f"reasonbench_{stem}"] = ("--reasonbench_code", src)
      reasonbench[dim] = reasonbench_protocol(src)
  else:
    notes.append("no --reasonbench_code: the texts hold no T2I-ReasonBench protocol "
                 "(eval.metrics=reasonbench will ask for it)")
  sources = {role: {"path": src.rel, "sha256": src.sha256,
                    "checkout": str(pathlib.Path(roots[flag]).resolve())}
             for role, (flag, src) in files.items()}
  texts = texts_lib.Texts(
      origin="official", gen_think_system=gen_system, judge_think_system=judge_system,
      global_template=global_template(vlm), region_template=region, region_block=block,
      region_joiner=joiner, box_format=box_format(vlm, block), prompt_rule="verbatim",
      compbench_question=compbench_question(files["srum_compbench_eval"][1]),
      reasonbench=reasonbench, sources=sources)
  texts_lib.check_texts(texts, "imported texts")
  return texts, notes


def summary(texts: texts_lib.Texts) -> List[str]:
  """One line per text: its length and SHA-256 (never the text), then each source file's hash."""
  def digest(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]
  items = [("gen_think_system", texts.gen_think_system),
           ("judge_think_system", texts.judge_think_system), ("global", texts.global_template),
           ("regions.template", texts.region_template), ("regions.block", texts.region_block),
           ("compbench_question", texts.compbench_question)]
  for dim, entry in texts.reasonbench.items():
    items.append((f"reasonbench.{dim}.describe", entry["describe"]))
    items += [(f"reasonbench.{dim}.{g}", q) for g, q in entry["questions"].items()]
  lines = [f"{k:<58} {len(v):>5} chars  sha256 {digest(v)}" for k, v in items]
  lines += [f"source {role:<26} {s['path']}  sha256 {s['sha256'][:16]}"
            for role, s in texts.sources.items()]
  return lines
