"""The texts model (`rewards.texts`) and the official-texts reader (`rewards.official_texts`).

The "official" files here are stand-ins written for these tests: laid out like BAGEL's
`inferencer.py`, SRUM's `srum_data_infer/vlm.py` and `CompBench_eval/qwen_eval.py`, and
T2I-ReasonBench's `eval_*.py` (same function and variable names, same statement shapes), with
sentences of our own. The reader parses them; the tests run the stand-in functions themselves (our
code) and compare their strings with the renders.
"""
import ast
import hashlib
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from srum_jax import config_utils, config_validation, errors
from srum_jax.rewards import official_texts, texts as texts_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

INFERENCER = '''\
from copy import deepcopy
import torch_is_never_imported_by_the_reader

VLM_THINK_SYSTEM_PROMPT = \'\'\'Reason quietly before you reply.\x20
Keep the reasoning inside <think> </think>, e.g. <think> steps </think> reply\'\'\'

GEN_THINK_SYSTEM_PROMPT = \'\'\'Sketch a plan before you paint.\x20
Keep the plan inside <think> </think>, e.g. <think> plan </think> picture\'\'\'


class InterleaveInferencer:
    def __init__(self, model):
        self.model = model
'''

VLM = '''\
import os
from inferencer import InterleaveInferencer  # not importable here: the reader never imports


def create_sample_level_evaluation_prompt(original_prompt: str) -> str:
    return f"""Rate the whole picture against "{original_prompt}"."""


def create_global_layout_reward_prompt(original_prompt: str) -> str:
    """Layout question."""
    return f"""# JOB: arrangement check
Look only at where things sit, for the request below.

**Request:** "{original_prompt}"
---
* Give one number in **[-1.0, 1.0]**; a brace pair {{like this}} stays literal.
    `Score: [number]`
    `Reason: [why]`
---
Go.
"""


def parse_global_layout_output(text):
    return {}


def create_hybrid_evaluation_prompt(original_prompt: str,
                                    detected_objects: list[dict]) -> str:
    """Region question."""
    regions_text = ""
    for i, obj in enumerate(detected_objects):
        region_id = i + 1
        obj['region_id'] = region_id
        regions_text += f"Area {region_id}\\nBox: {obj['bbox']}\\n---\\n"

    return f"""# JOB: one score per area
**Request:** "{original_prompt}"
---
**AREAS TO LOOK AT:**
{regions_text}
---
For each area: `Identified Object: ...` then `Score: [number]`.
"""
'''

QWEN_EVAL = '''\
import json


def main():
    for image_file in image_files:
        try:
            prompt_name = prompts_map.get(image_file)
            question_id = int(image_file.split(".")[0])
            question_text = (
                f"Check the picture against the prompt. "
                f"How well does it show \\"{prompt_name}\\"? "
                f"Use 0 to 100. \\n"
                f"Reply as JSON with keys score and explanation."
            )
        except ValueError:
            continue
'''

REASONBENCH_GROUPS = {"idiom": ("reason",), "textual_image": ("reason",),
                      "entity": ("entity", "other_details"),
                      "scientific": ("scientific", "other_details")}


def reasonbench_eval(stem: str) -> str:
  groups = REASONBENCH_GROUPS[stem] + ("quality",)
  reads = "".join(f'            qs_{g}_question_criteria = qs[num]["{g}_evaluation"]\n'
                  for g in groups)
  asks = "".join(f'''            q{k} = f"""\\
Using what you said, grade each item: {{qs_{g}_question_criteria}}
Reply as {{{{"why": [...], "score": [s1, ...]}}}}"""
            out{k} = ask(q{k})
''' for k, g in enumerate(groups, start=2))
  return ("def eval(args):\n"
          "    for i in range(n):\n"
          "            num = i\n"
          + reads
          + '            q1 = "Say what you see."\n'
          + asks)


def write_checkouts(tmp: pathlib.Path, vlm: str = VLM, inferencer: str = INFERENCER):
  """(bagel, srum, reasonbench) stand-in checkouts under `tmp`."""
  bagel, srum, rb = tmp / "Bagel", tmp / "SRUM", tmp / "T2I-ReasonBench"
  for path, text in ((bagel / "inferencer.py", inferencer),
                     (srum / "srum_data_infer" / "vlm.py", vlm),
                     (srum / "CompBench_eval" / "qwen_eval.py", QWEN_EVAL)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  for stem in REASONBENCH_GROUPS:
    p = rb / "evaluation" / "Qwen2.5-VL" / f"eval_{stem}.py"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(reasonbench_eval(stem))
  return str(bagel), str(srum), str(rb)


def stand_in(path, *names):
  """Run the stand-in's own definitions (functions, module strings) and return them by name."""
  tree = ast.parse(pathlib.Path(path).read_text())
  body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names
          or isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) in names]
  ns = {}
  exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
  return ns


def run_assignments(path, function, env, *names):
  """Execute the assignments to `names` inside `function` (in source order) with `env` bound."""
  fn = next(n for n in ast.walk(ast.parse(pathlib.Path(path).read_text()))
            if isinstance(n, ast.FunctionDef) and n.name == function)
  stmts = sorted((n for n in ast.walk(fn)
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) in names),
                 key=lambda n: n.lineno)
  ns = dict(env)
  exec(compile(ast.Module(body=stmts, type_ignores=[]), str(path), "exec"), ns)
  return ns


PROMPTS = ["a red apple left of a bowl", "two  cats\nand a dog", ' "quoted" {braces} ',
           "un café, 3 éléphants"]
BOXES = [[], [[0, 0, 1024, 1024]], [[12, 40, 300, 512], [0, 0, 5, 5], [1.5, 2.0, 3, 4]],
         [[k, 2 * k, k + 100, 2 * k + 50] for k in range(10)]]


def test_import_renders_what_the_official_functions_return(tmp_path):
  bagel, srum, rb = write_checkouts(tmp_path)
  texts, notes = official_texts.import_texts(bagel, srum, rb)
  assert (texts.origin, texts.prompt_rule, texts.box_format) == ("official", "verbatim",
                                                                 "python_list")
  sys_prompts = stand_in(pathlib.Path(bagel) / "inferencer.py", "GEN_THINK_SYSTEM_PROMPT",
                         "VLM_THINK_SYSTEM_PROMPT")
  # the trailing space before the newline is kept
  assert texts.gen_think_system == sys_prompts["GEN_THINK_SYSTEM_PROMPT"]
  assert texts.judge_think_system == sys_prompts["VLM_THINK_SYSTEM_PROMPT"]
  vlm_path = pathlib.Path(srum) / "srum_data_infer" / "vlm.py"
  fns = stand_in(vlm_path, "create_global_layout_reward_prompt", "create_hybrid_evaluation_prompt")
  global_fn, regions_fn = fns["create_global_layout_reward_prompt"], fns[
      "create_hybrid_evaluation_prompt"]
  qwen = pathlib.Path(srum) / "CompBench_eval" / "qwen_eval.py"
  for prompt in PROMPTS:
    assert texts_lib.render_global(texts, prompt) == global_fn(prompt)
    for boxes in BOXES:
      objects = [{"bbox": list(b), "area": 1} for b in boxes]
      assert texts_lib.render_regions(texts, prompt, boxes) == regions_fn(prompt, objects)
    want = run_assignments(qwen, "main", {"prompt_name": prompt}, "question_text")
    assert texts_lib.render_compbench(texts, prompt) == want["question_text"]
  # NumPy coordinates are written as the Python numbers they hold
  np_boxes = [np.array([1, 2, 3, 4], np.int64)]
  assert texts_lib.render_regions(texts, "x", np_boxes) == regions_fn("x", [{"bbox": [1, 2, 3, 4]}])
  for dim, stem in official_texts.REASONBENCH_FILES.items():
    path = pathlib.Path(rb) / "evaluation" / "Qwen2.5-VL" / f"eval_{stem}.py"
    groups = [f"{g}_evaluation" for g in REASONBENCH_GROUPS[stem] + ("quality",)]
    assert list(texts.reasonbench[dim]["questions"]) == groups
    qs = [{"id": 1, **{g: [f"q{k}: is {g} right?", f"c{k}: 1 if so"]
                       for k, g in enumerate(groups)}},
          {"id": 2, **{g: "a plain string entry" for g in groups}}]
    for num in range(2):
      names = (["q1"] + [f"q{k}" for k in range(2, len(groups) + 2)]
               + [f"qs_{g[:-len('_evaluation')]}_question_criteria" for g in groups])
      ns = run_assignments(path, "eval", {"qs": qs, "num": num, "ask": len}, *names)
      assert texts_lib.reasonbench_describe(texts, dim) == ns["q1"]
      for k, g in enumerate(groups, start=2):
        assert texts_lib.render_reasonbench(texts, dim, g, qs[num][g]) == ns[f"q{k}"]
  for role, (flag, rel) in official_texts.SOURCES.items():  # provenance: the files' own hashes
    root = {"--bagel_code": bagel, "--srum_code": srum}[flag]
    assert texts.sources[role]["path"] == rel
    file_hash = hashlib.sha256((pathlib.Path(root) / rel).read_bytes()).hexdigest()
    assert texts.sources[role]["sha256"] == file_hash
  assert texts.sources["reasonbench_entity"]["path"] == "evaluation/Qwen2.5-VL/eval_entity.py"
  assert notes == []  # no SRUM inferencer copy here, the ReasonBench checkout given
  # a file round trip keeps every byte
  out = tmp_path / "texts.json"
  texts_lib.save_texts(texts, str(out))
  assert texts_lib.load_texts(str(out)) == texts


def test_formats_concatenation_constants_and_joins_are_read(tmp_path):
  """Other ways to write the same builders: a module constant, `+`, `"...".format(...)` with a
  conversion and a format spec, a join over `enumerate(..., start=1)`."""
  vlm = textwrap.dedent('''\
      HEADER = "# JOB: " + "layout"
      RULE = f"""Scores run {'from'} -1 to 1."""


      def create_global_layout_reward_prompt(original_prompt):
          return (HEADER + "\\nRequest: {}\\nAlso: {p!r} {n:>6}".format(
              original_prompt, p=original_prompt, n="x") + RULE)


      def create_hybrid_evaluation_prompt(original_prompt, detected_objects):
          regions_text = "\\n".join(f"[{k}] {obj['bbox']!s}"
                                   for k, obj in enumerate(detected_objects, start=1))
          tail = "Answer per area."
          return f"Request: {original_prompt!r}\\n" + regions_text + "\\n" + tail
      ''')
  bagel, srum, _ = write_checkouts(tmp_path, vlm=vlm)
  texts, notes = official_texts.import_texts(bagel, srum)
  assert texts.reasonbench == {} and any("--reasonbench_code" in n for n in notes)
  assert texts.region_joiner == "\n"
  fns = stand_in(pathlib.Path(srum) / "srum_data_infer" / "vlm.py", "HEADER", "RULE",
                 "create_global_layout_reward_prompt", "create_hybrid_evaluation_prompt")
  for prompt in PROMPTS:
    want = fns["create_global_layout_reward_prompt"](prompt)
    assert texts_lib.render_global(texts, prompt) == want
    for boxes in BOXES:
      objects = [{"bbox": list(b)} for b in boxes]
      want = fns["create_hybrid_evaluation_prompt"](prompt, objects)
      assert texts_lib.render_regions(texts, prompt, boxes) == want
  with pytest.raises(errors.UserError, match="reasonbench_code"):
    texts_lib.reasonbench_describe(texts, "entity_reasoning")


def _changed(text: str, old: str, new: str) -> str:
  assert old in text
  return text.replace(old, new)


LAYOUT_CHANGES = [
    ("system prompt renamed", "inferencer", "GEN_THINK_SYSTEM_PROMPT =", "GEN_SYSTEM_PROMPT =",
     ["inferencer.py", "GEN_THINK_SYSTEM_PROMPT"]),
    ("builder renamed", "vlm", "def create_global_layout_reward_prompt(", "def make_layout_prompt(",
     ["srum_data_infer/vlm.py", "create_global_layout_reward_prompt"]),
    ("a call on the prompt", "vlm", '**Request:** "{original_prompt}"\n---\n* Give',
     '**Request:** "{original_prompt.strip()}"\n---\n* Give',
     ["vlm.py:", "replacement field", "strip"]),
    ("a condition in the region loop", "vlm", "        obj['region_id'] = region_id\n",
     "        if region_id > 3:\n            break\n",
     ["vlm.py:", "unexpected If in the region loop"]),
    ("another field of the object", "vlm", "Box: {obj['bbox']}", "Box: {obj['area']}",
     ["vlm.py:", "obj['area']"]),
    ("region ids from 0", "vlm", "region_id = i + 1", "region_id = i + 0",
     ["no region id counting from 1"]),
    ("two returns", "vlm", '    """Layout question."""\n',
     '    """Layout question."""\n    return "x"\n',
     ["create_global_layout_reward_prompt() should end in one `return <string>`"]),
    ("question variable renamed", "qwen", "question_text = (", "question = (",
     ["qwen_eval.py", "question_text"]),
    ("not Python", "vlm", "def create_sample_level", "def create_sample_level(((",
     ["cannot be parsed"]),
]


@pytest.mark.parametrize("name,which,old,new,needles", LAYOUT_CHANGES,
                         ids=[c[0] for c in LAYOUT_CHANGES])
def test_a_changed_layout_is_a_one_line_error(tmp_path, name, which, old, new, needles):
  vlm, inferencer = VLM, INFERENCER
  if which == "vlm":
    vlm = _changed(VLM, old, new)
  elif which == "inferencer":
    inferencer = _changed(INFERENCER, old, new)
  bagel, srum, _ = write_checkouts(tmp_path, vlm=vlm, inferencer=inferencer)
  if which == "qwen":
    q = pathlib.Path(srum) / "CompBench_eval" / "qwen_eval.py"
    q.write_text(_changed(q.read_text(), old, new))
  with pytest.raises(errors.UserError) as e:
    official_texts.import_texts(bagel, srum)
  message = str(e.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, (needle, message)


def test_reasonbench_layout_change_and_missing_checkout(tmp_path):
  bagel, srum, rb = write_checkouts(tmp_path)
  p = pathlib.Path(rb) / "evaluation" / "Qwen2.5-VL" / "eval_entity.py"
  p.write_text(p.read_text().replace('qs[num]["entity_evaluation"]', "pick(qs, num)"))
  with pytest.raises(errors.UserError,
                     match=r"eval_entity\.py:\d+: eval\(\): qs_entity_question_criteria"):
    official_texts.import_texts(bagel, srum, rb)
  with pytest.raises(errors.UserError, match="--srum_code .*no srum_data_infer/vlm.py"):
    official_texts.import_texts(bagel, str(tmp_path))


def _cli(*args):
  p = subprocess.run([sys.executable, "-m", "srum_jax", "texts", *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  return p.returncode, p.stdout, p.stderr


def test_cli_import_and_show(tmp_path):
  bagel, srum, rb = write_checkouts(tmp_path)
  out = tmp_path / "texts.json"
  rc, stdout, stderr = _cli("import", f"--bagel_code={bagel}", f"--srum_code={srum}",
                            f"--reasonbench_code={rb}", f"--out={out}")
  assert rc == 0, stderr
  assert "sha256" in stdout and "Sketch a plan" not in stdout  # hashes and lengths, never the texts
  boxes = [[12, 40, 300, 512], [0, 0, 5, 5]]
  rc, stdout, stderr = _cli("show", f"--texts={out}", "--prompt=two  cats",
                            f"--boxes={json.dumps(boxes)}")
  assert rc == 0, stderr
  shown = json.loads(stdout)
  vlm = pathlib.Path(srum) / "srum_data_infer" / "vlm.py"
  fns = stand_in(vlm, "create_global_layout_reward_prompt", "create_hybrid_evaluation_prompt")
  sys_prompts = stand_in(pathlib.Path(bagel) / "inferencer.py", "GEN_THINK_SYSTEM_PROMPT",
                         "VLM_THINK_SYSTEM_PROMPT")
  objects = [{"bbox": b} for b in boxes]
  assert shown == {"gen_think_system": sys_prompts["GEN_THINK_SYSTEM_PROMPT"],
                   "judge_think_system": sys_prompts["VLM_THINK_SYSTEM_PROMPT"],
                   "global": fns["create_global_layout_reward_prompt"]("two  cats"),
                   "regions": fns["create_hybrid_evaluation_prompt"]("two  cats", objects)}
  # no --texts: the own set
  rc, stdout, _ = _cli("show", "--prompt=two  cats", f"--boxes={json.dumps(boxes)}")
  own = texts_lib.own_texts()
  assert rc == 0 and json.loads(stdout) == texts_lib.show(own, "two  cats", boxes)
  vlm.write_text(VLM.replace("regions_text +=", "regions_text -="))
  rc, stdout, stderr = _cli("import", f"--bagel_code={bagel}", f"--srum_code={srum}",
                            f"--out={tmp_path / 'b.json'}")
  assert rc == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ")
  assert "vlm.py:" in stderr and not (tmp_path / "b.json").exists()
  rc, _, stderr = _cli("show", "--prompt=x", "--boxes=[[1, 2]]")
  assert rc == 2 and "--boxes" in stderr and stderr.count("\n") == 1


# Digests of the own texts' renders before they became templates (the shapes world's model was
# trained on them): the own set must keep every byte.
OWN_DIGESTS = [
    ("two red circles", [[1, 2, 13, 14]], "8dd1f1c40bf1cceb", "e4aeb9f8714a4cb9"),
    ("a cat  left of\na dog", [[0, 0, 10, 20], [5.5, 1, 7, 8]], "d73172972ccf34b8",
     "229ec8b1e3a403e3"),
    ("x", [], "e52c33ffa43149ac", "ed569b083270fc78"),
    ("a blue square above a green triangle", [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
     "7da819924d0215ac", "cb328ca2ede0248d"),
]


def test_own_texts_keep_every_byte():
  own = texts_lib.own_texts()
  h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
  assert h(own.gen_think_system) == "a8836e43d3225e4b"
  assert h(own.judge_think_system) == "5ec6d66cb3ac025f"
  for prompt, boxes, g, r in OWN_DIGESTS:
    assert h(texts_lib.render_global(own, prompt)) == g
    assert h(texts_lib.render_regions(own, prompt, boxes)) == r
  assert texts_lib.from_setting("") == texts_lib.from_setting("own") == own
  for name in ("tiny_world.py", "tiny_pipeline.py"):  # the shapes world keeps its own texts
    assert config_utils.load_config(str(ROOT / "experiments" / name)).texts.file == "own"


def test_texts_files_are_checked(tmp_path):
  good = texts_lib.to_json(texts_lib.own_texts())
  cases = {
      "format": ({**good, "format": "other"}, "not a texts file"),
      "placeholder": ({**good, "global": "no prompt here"}, "global: placeholders"),
      "extra placeholder": ({**good, "compbench_question": "{prompt} {category}"},
                            "compbench_question"),
      "box": ({**good, "regions": {**good["regions"], "box": "xyxy"}}, "regions.box"),
      "missing": ({k: v for k, v in good.items() if k != "regions"}, "missing or malformed"),
      "broken template": ({**good, "global": "{prompt"}, "not a valid template"),
  }
  for name, (data, needle) in cases.items():
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(errors.UserError, match=needle):
      texts_lib.load_texts(str(path))
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(errors.UserError, match="not valid JSON"):
    texts_lib.load_texts(str(tmp_path / "bad.json"))
  with pytest.raises(errors.UserFileNotFoundError, match="texts import"):
    texts_lib.load_texts(str(tmp_path / "none.json"))


def test_the_paper_config_requires_the_official_set(tmp_path):
  paper = str(ROOT / "experiments" / "bagel_7b_compbench.py")
  with pytest.raises(errors.UserError,
                     match=r"texts\.file is empty.*texts import --bagel_code=.*texts\.file=own"):
    config_validation.check_texts(config_utils.load_config(paper), "score")
  config_validation.check_texts(config_utils.load_config(paper, {"texts.file": "own"}), "score")
  bagel, srum, _ = write_checkouts(tmp_path)
  texts, _ = official_texts.import_texts(bagel, srum)
  path = tmp_path / "texts.json"
  texts_lib.save_texts(texts, str(path))
  cfg = config_utils.load_config(paper, {"texts.file": str(path), "eval.metrics": "mllm"})
  config_validation.check_texts(cfg, "eval")
  cfg = config_utils.load_config(paper, {"texts.file": str(path), "eval.metrics": "reasonbench"})
  with pytest.raises(errors.UserError, match="no T2I-ReasonBench protocol"):
    config_validation.check_texts(cfg, "eval")
  assert texts.reasonbench == {}  # imported without --reasonbench_code
