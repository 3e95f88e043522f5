"""Config system and CLI: every experiment loads, overrides apply, wrong keys fail, sweeps expand."""
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from srum_jax import cli, config_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_loads(path):
  module = config_utils.load_config_module(str(path))
  cfg = module.get_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  for key in ("seed", "workdir", "model", "mesh", "srum", "train"):
    assert key in cfg, f"{path.name} lacks {key}"
  if hasattr(module, "get_sweep"):
    points = config_utils.get_sweep(str(path))
    assert points and all(isinstance(p, dict) for p in points)


def test_overrides_and_unknown_keys():
  spec = str(ROOT / "experiments/bagel_7b_compbench.py")
  cfg = config_utils.load_config(spec, {"srum.lambda_constraint": 0.25, "train.lr": 1e-4})
  assert cfg.srum.lambda_constraint == 0.25 and cfg.train.lr == 1e-4
  with pytest.raises(KeyError, match="srum.nope"):
    config_utils.load_config(spec, {"srum.nope": 1})


def test_paper_recipe_v5p_variant():
  """`:v5p` changes only how the step and inference run (no remat, data-parallel inference), never
  the recipe; another arg is refused."""
  spec = str(ROOT / "experiments/bagel_7b_compbench.py")
  base, v5p = config_utils.load_config(spec), config_utils.load_config(spec + ":v5p")
  assert base.model.remat and not v5p.model.remat
  assert (base.inference_mesh.tensor, v5p.inference_mesh.tensor) == (4, 1)
  assert not base.train.tpu_collective_matmul and not v5p.train.tpu_collective_matmul
  v5p.model.remat, v5p.inference_mesh.tensor = True, 4
  assert v5p.to_dict() == base.to_dict()
  with pytest.raises(ValueError, match="v6e"):
    config_utils.load_config(spec + ":v6e")


def test_sweep_dry_run_prints_one_line_per_point(capsys, tmp_path, monkeypatch):
  """One command per point: the sweep command's own overrides, then the point's values, in its own workdir."""
  spec = str(ROOT / "experiments/bagel_7b_compbench.py")
  argv = ["srum_jax", "sweep", f"--config={spec}", "--dry_run", "--sweep_command=train",
          "--config.model.dir=/ckpt/b7", "--config.train.lr=3e-5", f"--config.workdir={tmp_path}"]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads --config.* overrides from sys.argv
  rc = cli.main(argv)
  out = capsys.readouterr().out.strip().splitlines()
  points = config_utils.get_sweep(spec)
  assert rc == 0 and len(out) == len(points) == 6
  assert "--config.srum.lambda_constraint=0.1" in out[0] and "--config.train.lr=1e-05" in out[0]
  assert all(" train " in line and "--config.model.dir=/ckpt/b7" in line for line in out)
  first = out[0].split()
  assert first.index("--config.train.lr=3e-5") < first.index("--config.train.lr=1e-05")  # the point's value wins
  workdirs = [line.split("--config.workdir=")[1].split()[0] for line in out]
  assert len(set(workdirs)) == 6 and all(w.startswith(str(tmp_path) + "/") for w in workdirs)


def test_cli_subprocess_override_and_bad_key():
  spec = str(ROOT / "experiments/bagel_7b_compbench.py")
  ok = subprocess.run([sys.executable, "-m", "srum_jax", "show-config", f"--config={spec}",
                       "--config.train.steps=7"], cwd=ROOT, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert "steps: 7" in ok.stdout
  bad = subprocess.run([sys.executable, "-m", "srum_jax", "show-config", f"--config={spec}",
                        "--config.train.no_such_key=1"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0
  assert "no_such_key" in (bad.stderr + bad.stdout)
  unknown = subprocess.run([sys.executable, "-m", "srum_jax", "frobnicate"], cwd=ROOT, capture_output=True,
                           text=True)
  assert unknown.returncode == 2 and "unknown subcommand" in unknown.stderr
