"""CLI fuzz: valid configs mutated at random (types, ranges, unknown keys, wrong files, broken config files)
end in exit 0 or in one `error: ` line with exit code 2, never a traceback.

The runs go through the CLI's own entry (`cli.main`: the config file's checks, the flag parser, every check of
the command) in this process, with each stage's work replaced by a no-op, so hundreds of runs take seconds;
a few of the same cases run again as real subprocesses. Configs mutated in memory (types the flag parser
would refuse) go straight to `config_validation.validate`.
"""
import concurrent.futures
import json
import math
import pathlib
import random
import subprocess
import sys

import ml_collections
import pytest

from srum_jax import cli, config_utils, config_validation, errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORLD = "experiments/tiny_world.py"
PAPER = "experiments/bagel_7b_compbench.py"
SHIPPED = ROOT / "srum_jax" / "worlds" / "shapes" / "checkpoint"
COMMANDS = ("show-config", "generate", "propose", "score", "train", "eval", "run", "pretrain")
VALUES = ("-1", "0", "1", "2", "3.5", "-0.5", "1e30", "1e-300", "nan", "inf", "-inf", "''", "bogus", "True",
          "False", "None", "(1,2)", "(0,)", "()", "(1,2,3)", "[1,'a']", "{'a':1}", "x" * 300, "'../..'", "7",
          "(32,32)", "(-8,8)", "('vit','bogus')", "'float64'", "'logit'", "'cuda:x'", "'..'", "'a b/c'")
PATH_KEYS = ("model.dir", "model.official_dir", "prompts.train.path", "prompts.val.path", "eval.images_dir",
             "eval.model_dir", "train.records", "train.images_root", "pretrain.init_from", "pretrain.ae.from_dir",
             "eval.hf_vlm_dir", "eval.mllm.rubric", "eval.geneval.metadata", "propose.options.weights_dir",
             "eval.reasonbench.prompts", "eval.oracle_fn", "prompts.train.function", "workdir")
CONFIG_FILES = {
    "syntax.py": "def get_config(arg=None)\n  return 1\n",
    "raises.py": "def get_config(arg=None):\n  raise RuntimeError('boom')\n",
    "dict.py": "def get_config(arg=None):\n  return {'a': 1}\n",
    "none.py": "def get_config(arg=None):\n  pass\n",
    "noget.py": "x = 1\n",
    "import_error.py": "import no_such_module_xyz\n",
    "partial_prompts.py": (f"import sys; sys.path.insert(0, {str(ROOT / 'experiments')!r})\nimport tiny_world\n"
                           "def get_config(arg=None):\n  c = tiny_world.get_config()\n"
                           "  c.prompts.val = {'source': 'file', 'path': 'PROMPTS', 'format': 'jsonl'}\n"
                           "  c.prompts.train = {'function': 'srum_jax.worlds.shapes.sources:prompts', "
                           "'kwargs': {'split': 'train', 'per_category': 1}, 'bogus_key': 1}\n  return c\n"),
    "sweeps.py": (f"import sys; sys.path.insert(0, {str(ROOT / 'experiments')!r})\nimport tiny_world\n"
                  "def get_config(arg=None):\n  return tiny_world.get_config()\n"
                  "def get_sweep(arg=None):\n  return SWEEP\n"),
}
SWEEPS = ("{'train.lr': 1e-4}", "[{'train.lr': 1e-4}, {'train.lrr': 1}]", "[]", "[{'train.lr': -1.0}]",
          "[{'train.steps': 'x'}]", "[{1: 2}]", "None", "[{'train.lr': 1e-4}, {'seed': 3}]")


@pytest.fixture(scope="module")
def files_root(tmp_path_factory):
  return make_files(tmp_path_factory.mktemp("fuzz_files"))


def make_files(d: pathlib.Path) -> pathlib.Path:
  """Wrong files of every kind, next to a few right ones, in `d`."""
  (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
  (d / "empty.txt").write_text("")
  (d / "empty_dir").mkdir()
  (d / "junk_dir").mkdir()
  (d / "junk_dir" / "x.txt").write_text("hello")
  (d / "bad.json").write_text("{\"a\": ")
  (d / "list.json").write_text("[1, 2, 3]")
  (d / "prompts.jsonl").write_text(json.dumps({"prompt": "a red circle", "category": "color"}) + "\n")
  (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  for name, text in CONFIG_FILES.items():
    if name != "sweeps.py":
      (d / name).write_text(text.replace("PROMPTS", str(d / "prompts.jsonl")))
  for i, sweep in enumerate(SWEEPS):
    (d / f"sweep_{i}.py").write_text(CONFIG_FILES["sweeps.py"].replace("SWEEP", sweep))
  return d


def _leaves(config, prefix=""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_leaves(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


LEAVES = sorted(_leaves(config_utils.load_config(WORLD)))


MODEL = ("seed", "workdir", "discard_stale", "model", "mesh", "inference_mesh")
READS = {"generate": MODEL + ("generate", "prompts"), "propose": ("propose", "discard_stale"),
         "score": MODEL + ("score",), "train": MODEL + ("train", "srum"), "pretrain": ("pretrain", "score"),
         "eval": MODEL + ("eval", "eval_generate", "score", "prompts"),
         "run": MODEL + ("generate", "prompts", "propose", "score", "train", "srum", "eval", "eval_generate", "run")}

def _typo(key: str, rng: random.Random) -> str:
  i = rng.randrange(len(key))
  return rng.choice([key[:i] + key[i + 1:], key[:i] + "x" + key[i:], key + ".sub", "no_such." + key])


def _case(rng: random.Random, files: pathlib.Path):
  """(argv after the program name): a command, a config spec and 1-3 mutations."""
  paths = [files / n for n in ("binary.bin", "empty.txt", "empty_dir", "junk_dir", "bad.json", "list.json",
                               "latin1.txt", "nope", "prompts.jsonl")] + [SHIPPED, SHIPPED / "ema.safetensors"]
  command = rng.choice(COMMANDS + ("sweep",))
  broken = [WORLD + ":bogus", PAPER + ":x", str(files / "nope.py"), str(files / "empty_dir")]
  broken += [str(files / n) for n in CONFIG_FILES if n != "sweeps.py"]
  spec = rng.choice(broken) if rng.random() < 0.12 else rng.choice([WORLD] * 8 + [PAPER, WORLD + ":gpu"])
  if command == "sweep":
    spec = rng.choice([PAPER, WORLD] + [str(files / f"sweep_{i}.py") for i in range(len(SWEEPS))])
  argv = [command, f"--config={spec}", f"--config.workdir={files / 'work'}"]
  if spec.startswith(PAPER):
    argv += [f"--config.model.official_dir={SHIPPED}", f"--config.prompts.train.path={files / 'prompts.jsonl'}",
             f"--config.prompts.val.path={files / 'prompts.jsonl'}"]
  if command == "sweep":
    argv += ["--dry_run", f"--sweep_command={rng.choice(['run', 'train', 'generate', 'bogus'])}"]
  read = [k for k in LEAVES if k.split(".")[0] in READS.get(command, ("train", "generate", "prompts"))]
  for _ in range(rng.randint(1, 3)):
    kind = rng.random()
    if kind < 0.55:
      argv.append(f"--config.{rng.choice(read)}={rng.choice(VALUES)}")
    elif kind < 0.65:
      argv.append(f"--config.{_typo(rng.choice(read), rng)}={rng.choice(VALUES)}")
    elif kind < 0.9:
      argv.append(f"--config.{rng.choice(PATH_KEYS)}={rng.choice(paths)}")
    else:
      argv.append(rng.choice(["--bogus_flag", "--config", "--config.", "--dry_run=maybe", "--workdir=",
                              f"--config.prompts.val={{'source': 'file', 'path': '{files / 'prompts.jsonl'}'}}",
                              "--config.prompts.train={'bogus': 1}", "--config.discard_stale=1"]))
  return argv


def _check(argv, rc, err, out):
  assert rc in (0, 2), (argv, rc, err[-2000:])
  assert "Traceback" not in err + out, (argv, err[-3000:])
  if rc == 2:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), (argv, err[-2000:])
    assert len(lines) == 1 or "usage:" in err, (argv, err[-2000:])


def test_cli_fuzz_never_tracebacks(files_root, capsys, monkeypatch):
  """600 mutated command lines through `cli.main` (the stage itself a no-op): exit 0 or one error line."""
  real = cli._resolve
  monkeypatch.setattr(cli, "_resolve", lambda target: real(target) if target.startswith("srum_jax.cli:")
                      else (lambda config, flags: 0))
  rng, codes = random.Random(29), {0: 0, 2: 0}
  for i in range(600):
    argv = _case(rng, files_root)
    try:
      rc = cli.main(["srum_jax", *argv])
    except SystemExit as e:  # absl may exit on a malformed flag; that must not happen either
      pytest.fail(f"SystemExit({e.code}) for {argv}")
    out = capsys.readouterr()
    _check(argv, rc, out.err, out.out)
    codes[rc] += 1
  assert codes[0] >= 20 and codes[2] >= 300, codes  # both outcomes are exercised


def _set_raw(config, key: str, value) -> None:
  """`config[key] = value` whatever the field's type (what a config file could assign)."""
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


RAW_VALUES = (None, -1, 0, 3.5, float("nan"), math.inf, "", "bogus", True, (1, 2), [1, "a"], {"a": 1}, b"x",
              object(), 10 ** 30, (), ("vit", 3), {"source": "file"})


def test_config_fuzz_validation_never_tracebacks(files_root):
  """300 configs with fields of any type (a config file can assign anything) through `validate`: it passes or
  raises a `UserError` (one line), nothing else."""
  rng = random.Random(290)
  base = config_utils.load_config(WORLD)
  outcomes = {"ok": 0, "user_error": 0}
  for i in range(300):
    cfg = base.copy_and_resolve_references()
    command = rng.choice(COMMANDS[1:])
    read = [k for k in LEAVES if k.split(".")[0] in READS[command]]  # keys the command reads
    keys = [rng.choice(read) for _ in range(rng.randint(1, 2))]
    values = [rng.choice(RAW_VALUES + tuple(str(files_root / n) for n in ("binary.bin", "empty_dir", "nope")))
              for _ in keys]
    for k, v in zip(keys, values):
      _set_raw(cfg, k, v)
    try:
      config_validation.validate(cfg, command)
      outcomes["ok"] += 1
    except errors.UserError as e:
      assert "\n" not in errors.one_line(e)
      outcomes["user_error"] += 1
    except Exception as e:  # noqa: BLE001 -- the point of the test
      pytest.fail(f"{command} {dict(zip(keys, values))}: {type(e).__name__}: {e}")
  assert outcomes["ok"] >= 10 and outcomes["user_error"] >= 100, outcomes


def test_cli_fuzz_cases_as_subprocesses(files_root):
  """A few of the fuzz's command lines (show-config and sweep dry runs: no stage work) as real processes."""
  rng = random.Random(7)
  cases = []
  while len(cases) < 4:
    argv = _case(rng, files_root)
    if argv[0] in ("show-config", "sweep"):
      cases.append(argv)

  def run(argv):
    p = subprocess.run([sys.executable, "-m", "srum_jax", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stderr, p.stdout

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for argv, (rc, err, out) in zip(cases, pool.map(run, cases)):
      _check(argv, rc, err, out)
