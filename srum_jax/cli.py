"""One entry point: `python -m srum_jax <subcommand> --config=experiments/x.py[:arg]
--config.a.b=v`.

Config-driven subcommands parse absl flags with `ml_collections.config_flags` (big_vision style: a
wrong override key is an error before any work starts). `convert`, `convert-sam` and `export` take
plain `--src/--dst` flags. Subcommand implementations are imported lazily so `--help` and config
checks stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import types
from typing import Callable, Dict, List, Tuple

from absl import flags, logging
from ml_collections import config_flags

from srum_jax import config_utils, config_validation, errors
from srum_jax.errors import UserValueError
from srum_jax.rewards import official_texts, texts as texts_lib

# name -> ("module:function", help). Config commands get (config, flags: the parsed CLI flags); raw
# commands get argv.
CONFIG_COMMANDS: Dict[str, Tuple[str, str]] = {
    "show-config": ("srum_jax.cli:show_config", "print the resolved config"),
    "sweep": ("srum_jax.cli:sweep",
              "expand get_sweep(): run points sequentially, or print them (--dry_run)"),
    "generate": ("srum_jax.pipeline.commands:generate_main",
                 "the UMM draws candidate images for the train prompts"),
    "propose": (
        "srum_jax.pipeline.commands:propose_main", "region proposals for the generated images"),
    "score": ("srum_jax.pipeline.commands:score_main", "self-judging: global + region rewards"),
    "train": ("srum_jax.pipeline.commands:train_main", "SRUM post-training on the reward records"),
    "eval": ("srum_jax.pipeline.commands:eval_main",
             "generate (or read eval.images_dir) and score eval.metrics"),
    "run": ("srum_jax.pipeline.commands:run_main",
            "the whole loop: eval -> generate -> propose -> score -> train -> eval"),
    "pretrain": ("srum_jax.pretrain.stages:main",
                 "pretrain a tiny BAGEL from scratch on a synthetic world (AE, then T2I + judge)"),
    "sample": ("srum_jax.pipeline.inference_commands:sample_main",
               "text to image (sample.prompts, sample.prompts_file)"),
    "edit": ("srum_jax.pipeline.inference_commands:edit_main",
             "edit an image by an instruction (edit.image, edit.prompt)"),
    "ask": ("srum_jax.pipeline.inference_commands:ask_main",
            "answer a question about an image (ask.image, ask.question)"),
}
RAW_COMMANDS: Dict[str, Tuple[str, str]] = {
    "convert": (
        "srum_jax.convert.hf_to_flax:main", "official BAGEL checkpoint dir -> orbax model dir"),
    "export": ("srum_jax.convert.flax_to_hf:main", "orbax model dir -> official safetensors"),
    "convert-sam": ("srum_jax.convert.sam_to_flax:main",
                    "SAM weights (sam_vit_*.pth / SamModel dir) -> orbax dir"),
    "texts": (
        "srum_jax.cli:texts_main",
        "official texts from your BAGEL / SRUM checkouts (import), what a stage sends (show)"),
}


def register(name: str, target: str, help_text: str) -> None:
  """Add a config-driven subcommand implemented by `module:function(config, flags)`."""
  CONFIG_COMMANDS[name] = (target, help_text)


def _resolve(target: str) -> Callable:
  module, _, fn = target.partition(":")
  return getattr(importlib.import_module(module), fn)


def usage() -> str:
  lines = [
      "usage: python -m srum_jax <subcommand> [--config=experiments/x.py[:arg]] "
      "[--config.key=value ...]",
      ""
  ]
  for name, (_, h) in sorted({**CONFIG_COMMANDS, **RAW_COMMANDS}.items()):
    lines.append(f"  {name:<12} {h}")
  return "\n".join(lines)


def show_config(config, flags) -> int:
  print(config, flush=True)  # a closed pipe (`| head`) fails here, inside the command, not at exit
  return 0


def sweep(config, flags) -> int:
  """Each point runs `sweep_command` with this command's own --config.* overrides, the point's
  values and its own workdir under `config.workdir`. Every point is parsed and validated before the
  first one runs (a dry run checks the values only: the files a point names may live on the machine
  that runs it)."""
  if flags.sweep_command not in CONFIG_COMMANDS or flags.sweep_command in ("sweep", "show-config"):
    stages = ", ".join(sorted(set(CONFIG_COMMANDS) - {"sweep", "show-config"}))
    raise errors.UserValueError(f"--sweep_command={flags.sweep_command!r} is not a stage; "
                                f"choose one of {stages}")
  spec = flags.config_spec
  overrides = [
      a for a in flags.argv if a.startswith("--config.") and not a.startswith("--config.workdir=")
  ]
  try:
    cmds = config_utils.sweep_commands(spec, flags.sweep_command,
                                       extra=list(flags.sweep_extra or []), workdir=config.workdir,
                                       overrides=overrides)
  except config_utils.ConfigFileError as e:
    raise errors.UserValueError(str(e)) from None
  for i, argv in enumerate(cmds):
    try:
      point, _ = _parse(flags.sweep_command, ["srum_jax"] + argv[4:])
      config_validation.validate(point, flags.sweep_command, check_files=not flags.dry_run)
    except (CommandLineError, errors.UserError) as e:
      shown = config_utils.shell_line(argv[4:])
      raise errors.UserValueError(f"sweep point {i + 1}/{len(cmds)} ({shown}): "
                                  f"{errors.one_line(e)}") from None
  for i, argv in enumerate(cmds):
    line = config_utils.shell_line(argv)
    print(f"[{i + 1}/{len(cmds)}] {line}", flush=True)
    if not flags.dry_run:
      rc = subprocess.call(argv)
      if rc != 0:
        print(f"sweep point {i + 1} failed with exit code {rc}", file=sys.stderr)
        return rc
  return 0


class CommandLineError(Exception):
  """A command line that cannot be parsed (one line; `usage`: the usage text helps)."""

  def __init__(self, message: str, usage: bool = False):
    super().__init__(message)
    self.usage = usage


def _config_spec(argv: List[str]) -> str:
  """The value of the last --config=... flag ('' when absent)."""
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return specs[-1] if specs else ""


def _override_error(spec: str, argv: List[str], e: BaseException) -> str:
  """One line for a failed flag parse: the unknown override key with the closest real one, else the
  parser's own message flattened."""
  config = config_utils.load_config(spec)  # loaded once already (`_parse`): it loads
  return config_validation.first_unknown_override(config, argv) or errors.one_line(e)


def _parse(name: str, argv: List[str]):
  """(config, parsed flags) of a config command's argv (argv[0]: the program); the config file is
  checked first (it imports, `get_config` returns a ConfigDict), then the overrides apply. Raises
  `CommandLineError`."""
  for a in argv[1:]:
    key, eq, _ = a.partition("=")
    bare = key in ("--config", "-config") and not eq
    if bare or key.startswith("--config.") and (not eq or key.endswith(".")):
      raise CommandLineError(f"flag {a!r}: expected --config=<file>[:arg] or "
                             f"--config.<key>=<value>")
  spec = _config_spec(argv)
  if spec:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      why = "is a folder, not a config file" if os.path.isdir(path) else "does not exist"
      raise CommandLineError(f"config file {path!r} {why} (--config={spec})")
    try:
      config_utils.load_config(spec)
    except config_utils.ConfigFileError as e:
      raise CommandLineError(str(e)) from None
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", flag_values=fv,
                                  lock_config=True, sys_argv=list(argv))
  flags.DEFINE_boolean("dry_run", False, "print what would run, run nothing", flag_values=fv)
  flags.DEFINE_string("sweep_command", "run", "subcommand each sweep point runs", flag_values=fv)
  flags.DEFINE_multi_string("sweep_extra", [], "extra flags appended to every sweep point",
                            flag_values=fv)
  flags.DEFINE_string("workdir", None, "overrides config.workdir when given", flag_values=fv)
  try:
    fv(argv)
    config = fv.config
  except flags.Error as e:
    if spec and isinstance(e, flags.IllegalFlagValueError):
      raise CommandLineError(_override_error(spec, argv, e)) from None
    raise CommandLineError(errors.one_line(e), usage=True) from None
  except Exception as e:  # an override the config's field cannot take (KeyError, TypeError, ...)
    raise CommandLineError(_override_error(spec, argv, e) if spec else errors.one_line(e)) from None
  if config is None:
    raise CommandLineError(f"{name} needs --config=experiments/<name>.py", usage=True)
  if fv.workdir is not None:
    with config.unlocked():
      config.workdir = fv.workdir
  return config, fv


def _run_config_command(name: str, argv: List[str]) -> int:
  try:
    config, fv = _parse(name, argv)
  except CommandLineError as e:
    print(f"error: {e}" + (f"\n\n{usage()}" if e.usage else ""), file=sys.stderr)
    return 2
  cli_flags = types.SimpleNamespace(
      config_spec=_config_spec(argv), dry_run=fv.dry_run, sweep_command=fv.sweep_command,
      sweep_extra=list(fv.sweep_extra), argv=list(argv[1:]))
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config_validation.validate(config, name)  # every key the command reads, before any work
  return int(_resolve(CONFIG_COMMANDS[name][0])(config, cli_flags) or 0)


def _user_errors(fn, *args) -> int:
  """`fn(*args)`; a user's error (`UserError`, an `OSError` the user fixes) is printed as one line:
  exit code 2."""
  try:
    return fn(*args)
  except errors.UserError as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
  except OSError as e:
    line = errors.os_error_line(e)
    if line is None or isinstance(e, BrokenPipeError):
      raise
    print(f"error: {line}", file=sys.stderr)
  return 2


# ----------------------------------------------------------------------------------------------
# `texts` (issue 28): the official texts from the user's checkouts (rewards/official_texts.py).

def texts_main(argv: List[str]) -> int:
  """`texts import --bagel_code=DIR --srum_code=DIR [--reasonbench_code=DIR] --out=FILE` writes the
  texts file; `texts show [--texts=FILE] --prompt=TEXT [--boxes=JSON]` prints one JSON object, the
  exact strings the stages would send (without --texts: the project's own). A user error is one
  line and exit code 2."""

  ap = argparse.ArgumentParser(prog="srum_jax texts",
                               description="the texts the stages send to the model")
  sub = ap.add_subparsers(dest="action", required=True)
  imp = sub.add_parser("import", help="read the official texts from your checkouts into a file")
  imp.add_argument("--bagel_code", required=True,
                   help="checkout of github.com/ByteDance-Seed/Bagel")
  imp.add_argument("--srum_code", required=True, help="checkout of github.com/WayneJin0918/SRUM")
  imp.add_argument("--reasonbench_code", default="",
                   help="checkout of github.com/KaiyueSun98/T2I-ReasonBench (optional)")
  imp.add_argument("--out", required=True, help="the texts file to write (JSON)")
  show = sub.add_parser("show", help="print what the stages would send for a prompt and boxes")
  show.add_argument("--texts", default="", help="a texts file ('' or 'own': the own texts)")
  show.add_argument("--prompt", required=True)
  show.add_argument("--boxes", default="[]",
                    help='JSON list of [x0, y0, x1, y1] pixel boxes, e.g. "[[0,0,8,8]]"')
  args = ap.parse_args(argv)
  try:
    if args.action == "import":
      texts, notes = official_texts.import_texts(args.bagel_code, args.srum_code,
                                                 args.reasonbench_code)
      texts_lib.save_texts(texts, args.out)
      for line in notes + official_texts.summary(texts):
        print(line)
      print(f"wrote {args.out}: pass it as --config.texts.file={args.out}")
      return 0
    shown = texts_lib.show(texts_lib.from_setting(args.texts), args.prompt, _boxes_flag(args.boxes))
    print(json.dumps(shown))  # ASCII with \u escapes: the same strings whatever the locale
    return 0
  except errors.UserError as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return 2


def _boxes_flag(text: str) -> list:
  """--boxes: a JSON list of 4-number lists."""

  try:
    boxes = json.loads(text)
  except ValueError as e:
    raise UserValueError(f"--boxes is not JSON ({errors.one_line(e)})") from None
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  if not (isinstance(boxes, list) and
          all(isinstance(b, list) and len(b) == 4 and all(map(number, b)) for b in boxes)):
    raise UserValueError(f"--boxes {text!r}: expected a JSON list of [x0, y0, x1, y1] number lists")
  return boxes

# ----------------------------------------------------------------------------------------------


def main(argv: List[str] | None = None) -> int:
  """The CLI. A closed standard output (`show-config | head`) ends the command quietly, exit code
  2."""
  try:
    return _main(list(sys.argv if argv is None else argv))
  except BrokenPipeError:
    # nothing more goes to the closed pipe, not even at exit
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 2


def _main(argv: List[str]) -> int:
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  name = argv[1]
  if name in RAW_COMMANDS:
    return _user_errors(lambda: int(_resolve(RAW_COMMANDS[name][0])(argv[2:]) or 0))
  if name in CONFIG_COMMANDS:
    return _user_errors(_run_config_command, name, [argv[0]] + argv[2:])
  print(f"error: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
  return 2
