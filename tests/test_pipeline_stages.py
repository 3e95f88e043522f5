"""The SRUM pipeline on the tiny random BAGEL: every stage, resumability, bad input, the whole `run`."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from srum_jax import config_utils, files
from srum_jax.data.prompt_sources import load_prompts
from srum_jax.engine import loaded_model
from srum_jax.pipeline import generate, propose, run, score, train as train_stage
from srum_jax.rewards import records
from srum_jax.rewards.texts import own_texts
from srum_jax.workdir import layout, logs
from srum_jax.worlds.shapes import judge_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments/tiny_pipeline.py")
OWN = own_texts()


def _config(model_dir, workdir, **overrides):
  cfg = config_utils.load_config(TINY, {"model.dir": model_dir, "workdir": str(workdir), **overrides})
  return cfg


def _two_processes(tiny_model_dir, workdir):
  """`python -m srum_jax run` of the tiny pipeline as 2 JAX processes (4 simulated CPU devices each, a local
  coordinator) sharing one workdir: started before the single-process run, they overlap with it."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = []
  for k in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", SRUM_NUM_PROCESSES="2", SRUM_PROCESS_ID=str(k),
               PYTHONUNBUFFERED="1",
               SRUM_COORDINATOR=f"127.0.0.1:{port}")
    log = open(workdir.parent / f"process_{k}.log", "w")
    # generation batches of 4 on each process's 4 devices: one row per device, as the single-process run's 8
    # rows on 8 devices, so both compile the same per-device program and draw bit-identical images
    procs.append((subprocess.Popen([sys.executable, "-m", "srum_jax", "run", f"--config={TINY}",
                                    f"--config.model.dir={tiny_model_dir}", f"--config.workdir={workdir}",
                                    "--config.generate.batch_size=4", "--config.eval_generate.batch_size=4"],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log.name))
  return procs


@pytest.mark.slow
def test_run_end_to_end_one_and_two_processes(tiny_model_dir, tmp_path):
  """generate -> propose -> score -> train -> eval (+ SFT control), with the report the oracle's numbers; the
  same run as 2 processes on one shared workdir does every item exactly once and ends with the same report
  and (within fp32 tolerance) the same trained parameters."""
  procs = _two_processes(tiny_model_dir, tmp_path / "two")
  cfg = _config(tiny_model_dir, tmp_path / "one")
  report = run.run(cfg)
  _check_run(report, tmp_path / "one")
  codes = [p.wait(timeout=900) for p, _ in procs]
  assert codes == [0, 0], "\n".join(f"process {k} exit {c}:\n{open(log).read()[-3000:]}"
                                     for k, (c, (_, log)) in enumerate(zip(codes, procs)))
  two = json.loads((tmp_path / "two" / "report" / "report.json").read_text())
  assert two["tables"] == report["tables"]
  for stage, stem in (("round_0/generate", "metadata"), ("round_0/propose", "regions"), ("round_0/score", "rewards"),
                      ("eval/srum", "judgments")):
    per_process = [r["id"] for p in sorted((tmp_path / "two" / stage).glob(f"{stem}.[0-9].jsonl"))
                   for r in logs.JsonlLog(str(p)).rows()]
    assert len(per_process) == len(set(per_process)) == 5, (stage, per_process)  # each item once, none lost
  one_rewards = {r["id"]: r for r in logs.JsonlLog(str(tmp_path / "one/round_0/score/rewards.jsonl")).rows()}
  two_rewards = {r["id"]: r for r in logs.JsonlLog(str(tmp_path / "two/round_0/score/rewards.jsonl")).rows()}
  assert set(one_rewards) == set(two_rewards)
  for k, r in one_rewards.items():
    assert abs(r["global_score"] - two_rewards[k]["global_score"]) < 1e-5
  # training: the same global batches (process p packs rows [p*4, p*4+4) of each), the same parameters
  one_log = [json.loads(line)["indices"] for line in open(tmp_path / "one/round_0/train/data_log.jsonl")]
  two_logs = [[json.loads(line)["indices"] for line in open(tmp_path / f"two/round_0/train/data_log.{k}.jsonl")]
              for k in range(2)]
  assert one_log == [a + b for a, b in zip(*two_logs)]
  import jax

  a = train_stage.final_params(str(tmp_path / "one/round_0/train"))
  b = train_stage.final_params(str(tmp_path / "two/round_0/train"))
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
  assert max(diffs) < 1e-5, max(diffs)


def _check_run(report, workdir):
  rep_dir = workdir / "report"
  for f in ("report.json", "report.md", "grid_before_after.png", "reward_overlays.png", "loss_curve_round_0.png"):
    assert (rep_dir / f).is_file(), f
  assert set(report["tables"]) == {"base", "sft", "srum"}
  # the table equals what the oracle says about the saved images (recomputed here from the PNGs)
  for name, table in report["tables"].items():
    d = pathlib.Path(report["eval_dirs"][name])
    rows = layout.read_metadata(str(d))
    assert len(rows) == table["overall"]["total"] == 5
    correct = sum(judge_text(files.load_rgb(str(d / r["image_file"]))[0], r["prompt"]) for r in rows)
    assert correct == table["overall"]["correct"]
  recs = logs.JsonlLog(str(workdir / "round_0/score/rewards.jsonl")).rows()
  assert len(recs) == 5 and all(-1 <= r["global_score"] <= 1 for r in recs)
  assert all(len(r["regions"]) >= 1 for r in recs)
  md = (rep_dir / "report.md").read_text()
  assert "| overall |" in md and "base" in md and "srum" in md
  stages = ["load", "eval/base", "round_0/generate", "round_0/propose", "round_0/score", "round_0/train",
            "eval/srum", "sft/train", "eval/sft"]
  assert list(report["stage_seconds"]) == stages and all(s >= 0 for s in report["stage_seconds"].values())
  assert sum(report["stage_seconds"].values()) <= report["seconds_this_invocation"] + 1e-6


def test_stages_resume_and_count_bad_input(tiny_model_dir, tmp_path):
  cfg = _config(tiny_model_dir, tmp_path)
  model = loaded_model.load_model(tiny_model_dir)
  items = load_prompts(cfg.prompts.train)
  gen_dir, prop_dir, score_dir = (str(tmp_path / k) for k in ("generate", "propose", "score"))
  rep = generate.generate(cfg.generate, model, items[:3], gen_dir, seed=0, texts=OWN)
  assert rep.generated == 3
  again = generate.generate(cfg.generate, model, items, gen_dir, seed=0, texts=OWN)
  assert again.skipped_done == 3 and again.generated == 2
  rows = layout.read_metadata(gen_dir)
  assert sorted(r["id"] for r in rows) == sorted(it.id for it in items)
  # same (seed, id) -> same image, independent of batch composition
  first = files.load_rgb(os.path.join(gen_dir, rows[0]["image_file"]))[0]
  solo = str(tmp_path / "solo")
  generate.generate(cfg.generate, model, [it for it in items if it.id == rows[0]["id"]], solo, seed=0, texts=OWN)
  np.testing.assert_array_equal(first, files.load_rgb(os.path.join(solo, layout.read_metadata(solo)[0]["image_file"]))[0])
  # bad input: one corrupt PNG, one missing image, one torn metadata line
  pathlib.Path(gen_dir, rows[1]["image_file"]).write_bytes(b"not a png")
  os.remove(os.path.join(gen_dir, rows[2]["image_file"]))
  with open(os.path.join(gen_dir, "metadata.jsonl"), "a") as f:
    f.write('{"id": "torn", "prompt": "a red')
  prep = propose.propose(cfg.propose, gen_dir, prop_dir)
  assert prep.skipped_bad_image == 2 and prep.proposed == 3
  srep = score.score(cfg.score, model, gen_dir, prop_dir, score_dir, seed=0, texts=OWN)
  assert srep.skipped_no_proposals == 2 and srep.scored == 3
  srep2 = score.score(cfg.score, model, gen_dir, prop_dir, score_dir, seed=0, texts=OWN)
  assert srep2.skipped_done == 3 and srep2.scored == 0
  stats = json.loads(pathlib.Path(score_dir, "stats.json").read_text())
  assert stats["report"]["scored"] == 0 and "global_histogram" in stats


def _generate_propose_score(cfg, model, tmp_path, n: int):
  """The first n train prompts through generate -> propose -> score; (generate dir, score dir, ScoreReport)."""
  gen_dir, prop_dir, score_dir = (str(tmp_path / k) for k in ("generate", "propose", "score"))
  generate.generate(cfg.generate, model, load_prompts(cfg.prompts.train)[:n], gen_dir, seed=0, texts=OWN)
  propose.propose(cfg.propose, gen_dir, prop_dir)
  return gen_dir, score_dir, score.score(cfg.score, model, gen_dir, prop_dir, score_dir, seed=0, texts=OWN)


def test_generate_and_score_modes(tiny_model_dir, tmp_path):
  """generate-mode judging on an untrained model: unparsable answers are retried, then defaulted and counted."""
  cfg = _config(tiny_model_dir, tmp_path, **{"score.mode": "generate"})
  model = loaded_model.load_model(tiny_model_dir)
  gen_dir, score_dir, rep = _generate_propose_score(cfg, model, tmp_path, n=2)
  assert rep.scored == 2
  assert rep.global_failures + rep.retries >= 0
  recs = logs.JsonlLog(os.path.join(score_dir, "rewards.jsonl")).rows()
  assert all(r["global_score"] is not None for r in recs)  # failures fall back to the default 0.0


@pytest.mark.slow
def test_identify_then_score_records_and_ema_training(tiny_model_dir, tmp_path):
  """Logits-mode regions with `region_identify` record the named object next to each score; with
  `train.ema_decay` > 0 the trained model `run` goes on with is the EMA of the weights, not the last step."""
  import jax
  cfg = _config(tiny_model_dir, tmp_path, **{"score.mode": "logits", "score.region_identify": True,
                                              "train.ema_decay": 0.5})
  model = loaded_model.load_model(tiny_model_dir)
  gen_dir, score_dir, rep = _generate_propose_score(cfg, model, tmp_path, n=2)
  recs = logs.JsonlLog(os.path.join(score_dir, "rewards.jsonl")).rows()
  assert rep.scored == 2 and rep.regions_scored >= 2
  regions = [g for r in recs for g in r["regions"]]
  assert regions and all(isinstance(g["object"], str) and -1 <= g["score"] <= 1 for g in regions)
  summary = run.train_model(cfg, model, os.path.join(score_dir, "rewards.jsonl"), gen_dir, str(tmp_path / "train"))
  ema, last = summary["state"].ema, summary["state"].params
  eq = lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b)))  # noqa: E731
  # the EMA tracks the trainable leaves only (None at frozen ones, whose parameters are kept)
  same = jax.tree.map(lambda p, e, w: eq(p, w if e is None else e), summary["params"], ema, last,
                      is_leaf=lambda x: x is None)
  assert all(jax.tree.leaves(same))
  moved = jax.tree.map(lambda e, w: e is None or eq(e, w), ema["bagel"], last["bagel"],
                       is_leaf=lambda x: x is None)
  assert not all(jax.tree.leaves(moved))  # the EMA lags the trained weights
  assert all(e is None for e in jax.tree.leaves(ema["ae"], is_leaf=lambda x: x is None))  # frozen


def _cli(args, **kw):
  return subprocess.Popen([sys.executable, "-m", "srum_jax", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_generate_killed_and_resumed_does_every_item_once(tiny_model_dir, tmp_path):
  args = ["generate", f"--config={TINY}", f"--config.model.dir={tiny_model_dir}", f"--config.workdir={tmp_path}",
          "--config.generate.batch_size=1", "--config.prompts.train.kwargs.per_category=6"]  # 30 items
  p = _cli(args)
  meta = tmp_path / "generate" / "metadata.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None:
    if meta.is_file() and len(meta.read_text().splitlines()) >= 1:
      break
    time.sleep(0.01)  # kill early: on an idle machine one image takes a few tens of ms
  p.send_signal(signal.SIGKILL)
  p.wait()
  done_before = len(logs.JsonlLog(str(meta)).rows())
  assert 1 <= done_before < 30
  out = _cli(args)
  text, _ = out.communicate(timeout=300)
  assert out.returncode == 0, text
  rows = logs.JsonlLog(str(meta)).rows()
  ids = [r["id"] for r in rows]
  assert len(ids) == len(set(ids)) == 30
  assert f"skipped_done={done_before}" in text
  assert all((tmp_path / "generate" / r["image_file"]).is_file() for r in rows)


def test_cli_errors_before_work(tmp_path):
  bad_key = _cli(["run", f"--config={TINY}", "--config.train.no_such=1", f"--config.workdir={tmp_path}"])
  text, _ = bad_key.communicate(timeout=120)
  assert bad_key.returncode != 0 and "no_such" in text
  missing = _cli(["run", f"--config={TINY}", f"--config.model.dir={tmp_path}/nope", f"--config.workdir={tmp_path}"])
  text, _ = missing.communicate(timeout=120)
  assert missing.returncode != 0 and "does not exist" in text
  assert not (tmp_path / "eval").exists()


def test_launch_scripts_dry_run():
  tpu = subprocess.run(["bash", "launch/tpu.sh", "run", "--dry_run", "--", "run", "--config=experiments/x.py"],
                       cwd=ROOT, capture_output=True, text=True)
  assert tpu.returncode == 0, tpu.stderr
  assert "--worker=all" in tpu.stdout and "python\\ -m\\ srum_jax\\ run" in tpu.stdout
  create = subprocess.run(["bash", "launch/tpu.sh", "create", "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, QUEUED="1", ACCELERATOR="v5p-64"))
  assert "queued-resources create" in create.stdout and "v5p-64" in create.stdout
  setup = subprocess.run(["bash", "launch/tpu.sh", "setup", "--dry_run"], cwd=ROOT, capture_output=True, text=True)
  assert "jax[tpu]" in setup.stdout.replace("\\", "")
  gpu = subprocess.run(["bash", "launch/gpu.sh", "--dry_run", "--", "train", "--config=experiments/x.py"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, NUM_PROCESSES="2", PROCESS_ID="1",
                                                                COORDINATOR="10.0.0.1:1234"))
  assert gpu.returncode == 0, gpu.stderr
  assert "SRUM_NUM_PROCESSES=2" in gpu.stdout and "SRUM_PROCESS_ID=1" in gpu.stdout and "srum_jax train" in gpu.stdout
  no_coord = subprocess.run(["bash", "launch/gpu.sh", "--dry_run", "--", "train"], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, NUM_PROCESSES="2"))
  assert no_coord.returncode == 2 and "COORDINATOR" in no_coord.stderr


@pytest.mark.slow
def test_score_killed_and_resumed_does_every_item_once(tiny_model_dir, tmp_path):
  cfg = _config(tiny_model_dir, tmp_path, **{"prompts.train.kwargs.per_category": 2})
  model = loaded_model.load_model(tiny_model_dir)
  items = load_prompts(cfg.prompts.train)
  generate.generate(cfg.generate, model, items, str(tmp_path / "generate"), seed=0, texts=OWN)
  propose.propose(cfg.propose, str(tmp_path / "generate"), str(tmp_path / "propose"))
  args = ["score", f"--config={TINY}", f"--config.model.dir={tiny_model_dir}", f"--config.workdir={tmp_path}",
          "--config.score.batch_size=1"]
  p = _cli(args)
  log = tmp_path / "score" / "rewards.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None:
    if log.is_file() and len(log.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  before = len(logs.JsonlLog(str(log)).rows())
  assert 1 <= before < 10
  out = _cli(args)
  text, _ = out.communicate(timeout=300)
  assert out.returncode == 0, text
  ids = [r["id"] for r in logs.JsonlLog(str(log)).rows()]
  assert len(ids) == len(set(ids)) == 10
  recs, rep = records.read_records(str(log))
  assert len(recs) == 10 and not rep.skipped
