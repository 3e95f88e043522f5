"""The official texts, read from the user's checkouts by parsing their source with `ast` (never importing or
executing it): `import_texts(bagel_code, srum_code, reasonbench_code)` -> `texts.Texts` (origin "official").

Where each text comes from (paths inside each checkout, `SOURCES`):

    BAGEL   inferencer.py                  GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT (module strings)
    SRUM    srum_data_infer/vlm.py         create_global_layout_reward_prompt(prompt)
                                           create_hybrid_evaluation_prompt(prompt, objects): the block each
                                           object adds in its loop (or a join over them) and the text around it
    SRUM    CompBench_eval/qwen_eval.py    main(): the `question_text` assignment
    T2I-ReasonBench (optional)
            evaluation/Qwen2.5-VL/eval_<dimension>.py   eval(): `q1` (the describe turn) and each later `qN`,
                                           filed under the criterion group its placeholder variable reads

A string expression becomes a `str.format` template: literals (braces doubled), f-strings (each replacement
field a named placeholder with its conversion and format spec kept), `+` concatenation, `"...".format(...)`
calls and names bound to such expressions in the module or the function. The function's prompt parameter
becomes {prompt}, the region id {region_id}, the object's box (`obj['bbox']`) {bbox}, the accumulated region
text {regions}, the benchmark's criterion entry {criteria}. Anything else (another call, an `if` in the
region loop, a second placeholder where one is expected, a missing function or variable) is a layout this
reader does not know: a one-line `LayoutChanged` error naming the file, the line and what was expected.
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
SRUM_INFERENCER_COPY = "srum_data_infer/inferencer.py"  # the copy vlm.py imports (checked equal when present)


class LayoutChanged(UserValueError):
  """An official source file no longer has the layout this reader expects (one line: file, line, what)."""


@dataclasses.dataclass
class SourceFile:
  """One parsed official file: its path relative to the checkout, SHA-256 of its bytes, and its module AST."""
  rel: str
  sha256: str
  tree: ast.Module

  def fail(self, node: Optional[ast.AST], why: str) -> LayoutChanged:
    line = f":{node.lineno}" if node is not None and hasattr(node, "lineno") else ""
    return LayoutChanged(f"{self.rel}{line}: {why} (the official file's layout changed; this reader needs an "
                         f"update)")


def read_source(root: str, rel: str, flag: str) -> SourceFile:
  """Parse `root/rel` (bytes hashed as they are on disk)."""
  base = pathlib.Path(root)
  if not base.is_dir():
    raise UserFileNotFoundError(f"{flag} {root!r} is not a directory")
  path = base / rel
  if not path.is_file():
    raise UserFileNotFoundError(f"{flag} {root}: no {rel} (is it a checkout of the right repository?)")
  data = path.read_bytes()
  try:
    tree = ast.parse(data.decode("utf-8"), filename=rel)
  except (SyntaxError, UnicodeDecodeError, ValueError) as e:
    raise LayoutChanged(f"{rel}: cannot be parsed as Python ({' '.join(str(e).split())})") from None
  return SourceFile(rel=rel, sha256=hashlib.sha256(data).hexdigest(), tree=tree)


# ------------------------------------------------------------------------------------------------------------
# String expressions -> templates.

def _escape(text: str) -> str:
  return text.replace("{", "{{").replace("}", "}}")


def ref_key(node: ast.AST) -> Optional[str]:
  """A name (`x`) or a constant-key subscript of a name (`x['k']`) as a lookup key; None for anything else."""
  if isinstance(node, ast.Name):
    return node.id
  if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
      and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
    return f"{node.value.id}[{node.slice.value!r}]"
  return None


class Templater:
  """Turns string expressions of one source into templates. `placeholders`: lookup key -> placeholder name;
  `bound`: name -> the expression it is bound to (module strings, the function's own string variables)."""

  def __init__(self, src: SourceFile, placeholders: Dict[str, str], bound: Dict[str, ast.AST], where: str):
    self.src, self.placeholders, self.bound, self.where = src, placeholders, bound, where
    self.used: List[str] = []
    self._depth = 0

  def template(self, node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return _escape(node.value)
    if isinstance(node, ast.JoinedStr):
      return "".join(self.template(v) if isinstance(v, ast.Constant) else self._field(v) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
      return self.template(node.left) + self.template(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
      return self._format_call(node)
    key = ref_key(node)
    if key is not None and key in self.placeholders:
      self.used.append(self.placeholders[key])
      return "{" + self.placeholders[key] + "}"
    if isinstance(node, ast.Name) and node.id in self.bound:
      return self._inline(node.id)
    raise self.src.fail(node, f"{self.where}: unexpected {type(node).__name__} "
                              f"{_short(node)!r} in a string expression")

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
    conv = "" if fv.conversion == -1 else "!" + chr(fv.conversion)
    spec = ""
    if fv.format_spec is not None:
      spec = ":" + self.text(fv.format_spec)
    key = ref_key(fv.value)
    if key is not None and key in self.placeholders:
      self.used.append(self.placeholders[key])
      return "{" + self.placeholders[key] + conv + spec + "}"
    if isinstance(fv.value, ast.Constant) or (isinstance(fv.value, ast.Name) and fv.value.id in self.bound):
      return _escape(format(_convert(self.text(fv.value), conv), spec[1:]))
    raise self.src.fail(fv, f"{self.where}: unexpected replacement field {{{_short(fv.value)}}}")

  def _format_call(self, call: ast.Call) -> str:
    """`"<literal>".format(args)`: the literal's fields renamed to the placeholders of their arguments."""
    receiver = self.text(call.func.value)
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
      raise self.src.fail(call, f"{self.where}: .format with *args / **kwargs")
    keywords = {k.arg: k.value for k in call.keywords}
    out, auto = [], 0
    try:
      parsed = list(string.Formatter().parse(receiver))
    except ValueError as e:
      raise self.src.fail(call, f"{self.where}: .format on a malformed string ({e})") from None
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
                              format_spec=None if not spec else ast.Constant(spec))
      ast.copy_location(fv, call)
      out.append(self._field(fv))
    return "".join(out)


def _convert(value: str, conv: str) -> object:
  return {"": value, "!s": str(value), "!r": repr(value), "!a": ascii(value)}[conv]


def _short(node: ast.AST) -> str:
  try:
    text = ast.unparse(node)
  except Exception:  # noqa: BLE001 (any node the unparser rejects is just described by its kind)
    text = type(node).__name__
  return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------------------------
# Finding things in a module.

def is_string_expression(node: ast.AST) -> bool:
  """Whether `node` is built from string literals: a literal, an f-string, `+` of them, `"...".format(...)`."""
  if isinstance(node, ast.Constant):
    return isinstance(node.value, str)
  if isinstance(node, ast.JoinedStr):
    return True
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    return is_string_expression(node.left) or is_string_expression(node.right)
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
          and is_string_expression(node.func.value))


def _string_bindings(body: List[ast.stmt]) -> Dict[str, ast.AST]:
  """`name = <string expression>` statements of a body (a later binding wins)."""
  out = {}
  for stmt in body:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
      value = stmt.value
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
      value = stmt.value
    else:
      continue
    target = stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target
    if isinstance(target, ast.Name) and is_string_expression(value):
      out[target.id] = value
  return out


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
  """The one function definition called `name` in the module (any depth)."""
  found = [n for n in ast.walk(src.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
  if len(found) != 1:
    raise src.fail(found[1] if found else None, f"expected one function {name}(), found {len(found)}")
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


def _local_strings(fn: ast.FunctionDef) -> Dict[str, ast.AST]:
  """The function's top-level `name = <string expression>` statements."""
  return _string_bindings(fn.body)


def _assignments(fn: ast.FunctionDef, name: str) -> List[ast.Assign]:
  """Every `name = ...` anywhere inside `fn` (loops, try blocks included)."""
  return [n for n in ast.walk(fn) if isinstance(n, ast.Assign) and len(n.targets) == 1
          and isinstance(n.targets[0], ast.Name) and n.targets[0].id == name]


def _one_assignment(src: SourceFile, fn: ast.FunctionDef, name: str) -> ast.Assign:
  found = _assignments(fn, name)
  if len(found) != 1:
    raise src.fail(fn, f"expected one assignment to {name} in {fn.name}(), found {len(found)}")
  return found[0]


def _field_names(node: ast.AST) -> List[str]:
  """The distinct lookup keys of the replacement fields of an f-string expression, in order."""
  keys: List[str] = []
  for n in ast.walk(node):
    if isinstance(n, ast.FormattedValue):
      k = ref_key(n.value)
      if k is not None and k not in keys:
        keys.append(k)
  return keys


def _single_field_template(src: SourceFile, node: ast.AST, placeholder: str, bound: Dict[str, ast.AST],
                           where: str) -> Tuple[str, str]:
  """(template, the variable it reads) of an f-string that reads exactly one variable, as {placeholder}."""
  keys = [k for k in _field_names(node) if k not in bound]
  if len(keys) != 1:
    raise src.fail(node, f"{where}: expected one replacement field, found {keys}")
  t = Templater(src, {keys[0]: placeholder}, bound, where)
  return t.template(node), keys[0]


# ------------------------------------------------------------------------------------------------------------
# The official functions.

def global_template(src: SourceFile, bound: Dict[str, ast.AST]) -> str:
  fn = function(src, "create_global_layout_reward_prompt")
  (prompt,) = _params(src, fn, 1)
  t = Templater(src, {prompt: "prompt"}, {**bound, **_local_strings(fn)}, fn.name)
  return t.template(_returned(src, fn))


def region_templates(src: SourceFile, bound: Dict[str, ast.AST]) -> Tuple[str, str, str]:
  """(region template, block template, joiner) of `create_hybrid_evaluation_prompt(prompt, objects)`."""
  fn = function(src, "create_hybrid_evaluation_prompt")
  prompt, objects = _params(src, fn, 2)
  local = {**bound, **_local_strings(fn)}
  acc, block, joiner = None, None, None
  for stmt in fn.body:
    if isinstance(stmt, ast.For):
      if acc is not None:
        raise src.fail(stmt, f"{fn.name}(): a second loop")
      acc, block = _accumulating_loop(src, fn, stmt, objects, bound)
      joiner = ""
  if acc is None:  # no loop: regions joined in one expression, `acc = "<sep>".join(<f-string> for ...)`
    for stmt in fn.body:
      if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
          and _is_join(stmt.value)):
        if acc is not None:
          raise src.fail(stmt, f"{fn.name}(): two joins")
        acc, (block, joiner) = stmt.targets[0].id, _joined_blocks(src, fn, stmt.value, objects, bound)
  if acc is None:
    raise src.fail(fn, f"{fn.name}(): no loop over {objects} building the region text")
  local.pop(acc, None)
  t = Templater(src, {prompt: "prompt", acc: "regions"}, local, fn.name)
  template = t.template(_returned(src, fn))
  if "regions" not in t.used:
    raise src.fail(fn, f"{fn.name}(): the returned text does not contain {acc}")
  return template, block, joiner


def _enumerated(src: SourceFile, fn: ast.FunctionDef, target: ast.AST, iterable: ast.AST,
                objects: str) -> Tuple[str, str, int]:
  """`for i, obj in enumerate(objects[, start=k])` -> (i, obj, k)."""
  ok = (isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name) and iterable.func.id == "enumerate"
        and len(iterable.args) in (1, 2) and isinstance(iterable.args[0], ast.Name) and iterable.args[0].id == objects
        and isinstance(target, ast.Tuple) and len(target.elts) == 2
        and all(isinstance(e, ast.Name) for e in target.elts))
  if not ok:
    raise src.fail(iterable, f"{fn.name}(): expected `for i, obj in enumerate({objects})`")
  start_node = iterable.args[1] if len(iterable.args) == 2 else next(
      (k.value for k in iterable.keywords if k.arg == "start"), ast.Constant(0))
  if not (isinstance(start_node, ast.Constant) and isinstance(start_node.value, int)):
    raise src.fail(iterable, f"{fn.name}(): enumerate's start is not a number")
  return target.elts[0].id, target.elts[1].id, start_node.value


def _block_fields(src: SourceFile, fn: ast.FunctionDef, index: str, obj: str, start: int,
                  offsets: Dict[str, int]) -> Dict[str, str]:
  """Placeholders of one region block: the id (the index, or a variable = index + c, counting from 1) and
  the object's box."""
  fields = {f"{obj}['bbox']": "bbox"}
  for name, off in [(index, 0), *offsets.items()]:
    if start + off == 1:
      fields[name] = "region_id"
  return fields


def _accumulating_loop(src: SourceFile, fn: ast.FunctionDef, loop: ast.For, objects: str,
                       bound: Dict[str, ast.AST]) -> Tuple[str, str]:
  """`acc = ""` then `for i, obj in enumerate(objects): ...; acc += <block>` -> (acc, block template)."""
  index, obj, start = _enumerated(src, fn, loop.target, loop.iter, objects)
  offsets, acc, block = {}, None, None
  for stmt in loop.body:
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
        and isinstance(stmt.value, ast.BinOp) and isinstance(stmt.value.op, ast.Add)
        and isinstance(stmt.value.left, ast.Name) and stmt.value.left.id == index
        and isinstance(stmt.value.right, ast.Constant) and isinstance(stmt.value.right.value, int)):
      offsets[stmt.targets[0].id] = stmt.value.right.value
    elif isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Subscript) for t in stmt.targets):
      continue  # writes into the caller's objects (the region id kept for parsing): no text
    elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add) and isinstance(stmt.target, ast.Name):
      if acc is not None:
        raise src.fail(stmt, f"{fn.name}(): two `+=` in the region loop")
      acc, block = stmt.target.id, stmt.value
    else:
      raise src.fail(stmt, f"{fn.name}(): unexpected {type(stmt).__name__} in the region loop")
  if acc is None:
    raise src.fail(loop, f"{fn.name}(): the region loop adds no text (`<name> += ...`)")
  inits = [s for s in fn.body if isinstance(s, ast.Assign) and len(s.targets) == 1
           and isinstance(s.targets[0], ast.Name) and s.targets[0].id == acc]
  if len(inits) != 1 or not (isinstance(inits[0].value, ast.Constant) and inits[0].value.value == ""):
    raise src.fail(loop, f"{fn.name}(): expected {acc} = \"\" before the region loop")
  fields = _block_fields(src, fn, index, obj, start, offsets)
  if "region_id" not in fields.values():
    raise src.fail(loop, f"{fn.name}(): no region id counting from 1 in the loop")
  t = Templater(src, fields, bound, f"{fn.name}() region block")
  template = t.template(block)
  if set(t.used) != {"region_id", "bbox"}:
    raise src.fail(block, f"{fn.name}(): the region block should show the id and {obj}['bbox']")
  return acc, template


def _is_join(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
          and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str))


def _joined_blocks(src: SourceFile, fn: ast.FunctionDef, call: ast.Call, objects: str,
                   bound: Dict[str, ast.AST]) -> Tuple[str, str]:
  """`"<sep>".join(<block> for i, obj in enumerate(objects))` -> (block template, sep)."""
  comp = call.args[0] if len(call.args) == 1 else None
  if not isinstance(comp, (ast.GeneratorExp, ast.ListComp)) or len(comp.generators) != 1 or comp.generators[0].ifs:
    raise src.fail(call, f"{fn.name}(): expected a join over one `for ... in enumerate({objects})`")
  gen = comp.generators[0]
  index, obj, start = _enumerated(src, fn, gen.target, gen.iter, objects)
  fields = _block_fields(src, fn, index, obj, start, {})
  t = Templater(src, fields, bound, f"{fn.name}() region block")
  template = t.template(comp.elt)
  if set(t.used) != {"region_id", "bbox"}:
    raise src.fail(comp, f"{fn.name}(): the region block should show the id (from 1) and {obj}['bbox']")
  return template, call.func.value.value


def box_format(block: str) -> str:
  """The box is written as `str()` of the official list: the block's {bbox} field must carry no format spec."""
  for _, name, spec, conv in string.Formatter().parse(block):
    if name == "bbox" and (spec or conv not in (None, "s", "r")):
      raise LayoutChanged(f"the region block formats the box with {{bbox!{conv}:{spec}}}; not supported")
  return "python_list"


def compbench_question(src: SourceFile) -> str:
  fn = function(src, "main")
  assign = _one_assignment(src, fn, "question_text")
  bound = {**module_strings(src), **_local_strings(fn)}
  return _single_field_template(src, assign.value, "prompt", bound, "main() question_text")[0]


def reasonbench_protocol(src: SourceFile) -> Dict[str, object]:
  """{"describe": q1, "questions": {group: template}} of one `eval_<dimension>.py`."""
  fn = function(src, "eval")
  bound = {**module_strings(src), **_local_strings(fn)}
  describe = Templater(src, {}, bound, "eval() q1").text(_one_assignment(src, fn, "q1").value)
  questions: Dict[str, str] = {}
  names = sorted({a.targets[0].id for a in ast.walk(fn) if isinstance(a, ast.Assign) and len(a.targets) == 1
                  and isinstance(a.targets[0], ast.Name) and re.fullmatch(r"q([2-9]|\d\d+)", a.targets[0].id)},
                 key=lambda s: int(s[1:]))
  if not names:
    raise src.fail(fn, "eval(): no second-turn questions q2, q3, ...")
  for name in names:
    template, var = _single_field_template(src, _one_assignment(src, fn, name).value, "criteria", bound,
                                           f"eval() {name}")
    source = _one_assignment(src, fn, var).value
    if not (isinstance(source, ast.Subscript) and isinstance(source.slice, ast.Constant)
            and isinstance(source.slice.value, str)):
      raise src.fail(source, f"eval(): {var} should read one criterion group, qs[...]['<group>']")
    group = source.slice.value
    if group in questions:
      raise src.fail(source, f"eval(): two questions read {group}")
    questions[group] = template
  return {"describe": describe, "questions": questions}


# ------------------------------------------------------------------------------------------------------------
# Everything.

def _source_entry(root: str, src: SourceFile) -> Dict[str, str]:
  return {"path": src.rel, "sha256": src.sha256, "checkout": str(pathlib.Path(root).resolve())}


def import_texts(bagel_code: str, srum_code: str, reasonbench_code: str = "") -> Tuple[texts_lib.Texts, List[str]]:
  """The official texts from the checkouts, checked; and notes for the user (one line each)."""
  roots = {"--bagel_code": bagel_code, "--srum_code": srum_code}
  files = {role: read_source(roots[flag], rel, flag) for role, (flag, rel) in SOURCES.items()}
  inferencer, vlm = files["bagel_inferencer"], files["srum_vlm"]
  gen_system = module_string(inferencer, "GEN_THINK_SYSTEM_PROMPT")
  judge_system = module_string(inferencer, "VLM_THINK_SYSTEM_PROMPT")
  notes = []
  if (pathlib.Path(srum_code) / SRUM_INFERENCER_COPY).is_file():
    copy = read_source(srum_code, SRUM_INFERENCER_COPY, "--srum_code")
    same = (module_string(copy, "GEN_THINK_SYSTEM_PROMPT") == gen_system
            and module_string(copy, "VLM_THINK_SYSTEM_PROMPT") == judge_system)
    files["srum_inferencer_copy"] = copy
    notes.append(f"SRUM's {SRUM_INFERENCER_COPY} system prompts {'equal' if same else 'DIFFER FROM'} BAGEL's "
                 f"(BAGEL's are used)")
  bound = module_strings(vlm)
  region, block, joiner = region_templates(vlm, bound)
  reasonbench: Dict[str, dict] = {}
  if reasonbench_code:
    for dim, stem in REASONBENCH_FILES.items():
      src = read_source(reasonbench_code, REASONBENCH_PATH.format(stem), "--reasonbench_code")
      files[f"reasonbench_{stem}"] = src
      reasonbench[dim] = reasonbench_protocol(src)
  else:
    notes.append("no --reasonbench_code: the texts hold no T2I-ReasonBench protocol (eval.metrics=reasonbench "
                 "will ask for it)")
  sources = {role: _source_entry(srum_code if role.startswith("srum") else
                                 bagel_code if role.startswith("bagel") else reasonbench_code, src)
             for role, src in files.items()}
  texts = texts_lib.Texts(
      origin="official", gen_think_system=gen_system, judge_think_system=judge_system,
      global_template=global_template(vlm, bound), region_template=region, region_block=block,
      region_joiner=joiner, box_format=box_format(block), prompt_rule="verbatim",
      compbench_question=compbench_question(files["srum_compbench_eval"]), reasonbench=reasonbench,
      sources=sources)
  texts_lib.check_texts(texts, "imported texts")
  return texts, notes


def summary(texts: texts_lib.Texts) -> List[str]:
  """One line per text: its length and SHA-256 (never the text itself), then each source's hash."""
  def h(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]
  items = [("gen_think_system", texts.gen_think_system), ("judge_think_system", texts.judge_think_system),
           ("global", texts.global_template), ("regions.template", texts.region_template),
           ("regions.block", texts.region_block), ("compbench_question", texts.compbench_question)]
  for dim, entry in texts.reasonbench.items():
    items += [(f"reasonbench.{dim}.describe", entry["describe"])]
    items += [(f"reasonbench.{dim}.{g}", q) for g, q in entry["questions"].items()]
  lines = [f"{k:<52} {len(v):>5} chars  sha256 {h(v)}" for k, v in items]
  lines += [f"source {role:<24} {s['path']}  sha256 {s['sha256'][:16]}" for role, s in texts.sources.items()]
  return lines
