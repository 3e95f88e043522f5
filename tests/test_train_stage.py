"""The `train` stage end to end on the golden tiny model, in subprocesses (2 simulated CPU devices).

Run A goes 6 steps uninterrupted. Run B is SIGKILLed after its step-2 checkpoint exists and step 3 has
started, run C resumes it and gets SIGTERM once step 4 is saved (it must save where it is and exit 0),
run D resumes to the end through the CLI entry `main` and reads its parameters back with `final_params`.
D's parameters must equal A's bit for bit, and the per-step record indices (last occurrence of each step
wins) must equal A's. One record's image decodes to NaN (monkeypatched loader): its steps are skipped and
counted. A shared persistent compilation cache makes B-D skip the compile.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from srum_jax.convert import checkpoint

pytestmark = pytest.mark.slow  # every test here shares one module fixture of several training runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
STEPS, SAVE_EVERY, N_RECORDS, NAN_FILE = 6, 2, 6, "img_3.png"

DRIVER = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
sys.path[:0] = [args["repo"], args["tests"]]
import jax
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", args["cache"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import numpy as np, zlib
from safetensors.numpy import load_file
from conftest import GOLDEN, tree_from_state_dict
from srum_jax import defaults
from srum_jax.convert import keymap
from srum_jax.models import config as model_config, params as params_lib
from srum_jax.pipeline import train
from srum_jax.pipeline import train_data

cfg = model_config.tiny()
keys = keymap.official_keys(cfg)
params = {"bagel": tree_from_state_dict(load_file(GOLDEN / "weights.safetensors"), keys["bagel"], params_lib.bagel_schema(cfg)),
          "ae": tree_from_state_dict(load_file(GOLDEN / "ae.safetensors"), keys["ae"], params_lib.ae_schema(cfg.ae))}

real_load = train_data.load_image
def load_image(path, image_hw):  # test hook: one record decodes to NaN
  x, size = real_load(path, image_hw)
  if os.path.basename(path) == args["nan_file"]:
    x = np.full_like(x, np.nan)
  return x, size
train_data.load_image = load_image

class WordTokenizer:
  def encode(self, text):
    return [zlib.crc32(w.encode()) % 100 for w in text.split()]

c = defaults.base_config()
c.seed = 0
c.model.compute_dtype = "float32"
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 1
t = c.train
t.steps, t.batch_size, t.samples_per_row = args["steps"], 2, 1
t.image_hw, t.num_tokens, t.text_capacity, t.max_regions = (32, 24), 12 + 12, 12, 3
t.image_resize = "fixed"
t.lr, t.warmup_steps = 1e-3, 1
t.save_every, t.keep_checkpoints, t.log_every, t.sample_every = args["save_every"], 2, 1, 3
t.data_threads = 2
if args["mode"] == "main":  # the CLI entry with the caller's model loader; params from the checkpoint
  src = os.path.join(args["workdir"], "source_model")  # the model dir trained from: its files are carried over
  os.makedirs(src, exist_ok=True)
  with open(os.path.join(src, "tokenizer.json"), "w") as f:
    f.write("{}")
  summary = train.main(c, model_dir=src, records=args["records"], images_root=args["images"],
                       workdir=args["workdir"], load_model=lambda config, model_dir: (cfg, params, WordTokenizer()))
  assert summary["steps"] == args["steps"] and summary["model_dir"] == os.path.join(args["workdir"], "model")
  final = train.final_params(args["workdir"])
  with open(os.path.join(args["workdir"], "summary.json")) as f:
    out = json.load(f)
else:
  hook = (lambda step: time.sleep(args["sleep"])) if args["sleep"] else None
  s = train.train(c, cfg=cfg, params=params, tokenizer=WordTokenizer(), records_path=args["records"],
                  images_root=args["images"], workdir=args["workdir"], step_hook=hook)
  final = s["params"]
  out = {k: v for k, v in s.items() if k not in ("state", "params", "cfg")}
leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(final))[0]
np.savez(os.path.join(args["workdir"], "final_params.npz"),
         **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
with open(os.path.join(args["workdir"], f"summary_{os.getpid()}.json"), "w") as f:
  json.dump(out, f)
'''


def _make_data(root):
  img = root / "images"
  img.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(N_RECORDS):
    name = NAN_FILE if i == 3 else f"img_{i}.png"
    Image.fromarray(rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)).save(img / name)
    lines.append(json.dumps({"schema_version": 1, "image_file": name, "prompt": f"a red cube {i} left of a ball",
                             "global_score": float(rng.uniform(-0.9, 0.9)),
                             "regions": [{"box": [2, 3, 14, 20], "score": float(rng.uniform(-1, 1))},
                                         {"box": [8, 0, 24, 12], "score": float(rng.uniform(-1, 1))}]}))
  (root / "records.jsonl").write_text("\n".join(lines) + "\n")
  return str(root / "records.jsonl"), str(img)


def _start(root, workdir, records, images, sleep=0.0, mode="train"):
  args = dict(repo=REPO, tests=TESTS, cache=str(root / "jax_cache"), records=records, images=images,
              workdir=str(workdir), steps=STEPS, save_every=SAVE_EVERY, sleep=sleep, nan_file=NAN_FILE,
              mode=mode)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  log = open(root / f"log_{os.path.basename(str(workdir))}_{time.time_ns()}.txt", "w")
  return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, stdout=log,
                          stderr=subprocess.STDOUT), log.name


def _wait_for_checkpoint(proc, workdir, step, timeout=240):
  """Poll until checkpoint `step` is committed (orbax renames the tmp dir and writes its metadata)."""
  d = os.path.join(workdir, "checkpoints", str(step))
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.isfile(os.path.join(d, "_CHECKPOINT_METADATA")) and os.path.isdir(os.path.join(d, "state")):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before checkpoint {step}")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint {step} after {timeout}s")


def _wait_for_step(proc, workdir, step, timeout=120):
  """Poll until the data log shows that `step` has started."""
  path = os.path.join(workdir, "data_log.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.isfile(path) and any(json.loads(l)["step"] >= step for l in open(path) if l.strip()):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}")
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached after {timeout}s")


def _finish(proc, logname, timeout=300):
  rc = proc.wait(timeout=timeout)
  return rc, open(logname).read()


def _summary(workdir, pid):
  with open(os.path.join(workdir, f"summary_{pid}.json")) as f:
    return json.load(f)


def _steps(workdir):
  """Per-step record indices from the data log; a re-run step overwrites the earlier entry."""
  out, raw = {}, []
  with open(os.path.join(workdir, "data_log.jsonl")) as f:
    for line in f:
      e = json.loads(line)
      raw.append(e["step"])
      out[e["step"]] = e["indices"]
  return [out[s] for s in sorted(out)], raw


def _run_all(root):
  records, images = _make_data(root)
  res = {}
  # A: uninterrupted (pays the compile; fills the shared cache)
  wa = root / "run_a"
  pa, la = _start(root, wa, records, images)
  res["a"] = (*_finish(pa, la), str(wa), pa.pid)
  assert res["a"][0] == 0, res["a"][1][-3000:]
  # B: SIGKILL once checkpoint 2 is committed and step 3 has started (so steps 2-3 must be re-run)
  wb = root / "run_b"
  pb, lb = _start(root, wb, records, images, sleep=0.4)
  _wait_for_checkpoint(pb, str(wb), 2)
  _wait_for_step(pb, str(wb), 3)
  pb.send_signal(signal.SIGKILL)
  res["b"] = (*_finish(pb, lb), str(wb), pb.pid)
  res["b_steps"] = _steps(str(wb))[1]
  res["b_ckpts"] = sorted(int(d) for d in os.listdir(wb / "checkpoints") if d.isdigit())
  # C: resume; SIGTERM once checkpoint 4 is committed (slow steps leave a wide margin on a loaded machine)
  pc, lc = _start(root, wb, records, images, sleep=3.0)
  _wait_for_checkpoint(pc, str(wb), 4)
  pc.send_signal(signal.SIGTERM)
  res["c"] = (*_finish(pc, lc), str(wb), pc.pid)
  # D: resume to the end through the CLI entry `main`; its parameters come back via `final_params`
  pd, ld = _start(root, wb, records, images, mode="main")
  res["d"] = (*_finish(pd, ld), str(wb), pd.pid)
  # E: resume once more with nothing left to do: the summary keeps the training's figures
  pe, le = _start(root, wb, records, images)
  res["e"] = (*_finish(pe, le), str(wb), pe.pid)
  return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The four runs, done once per session even under pytest-xdist (a lock in the shared temp root)."""
  import fcntl
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's root
  with open(shared / "train_stage.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = shared / "train_stage_runs.json"
    if done.exists():
      return json.loads(done.read_text())
    root = shared / "train_stage"
    if root.exists():
      import shutil
      shutil.rmtree(root)
    root.mkdir()
    res = _run_all(root)
    done.write_text(json.dumps(res))
    return json.loads(done.read_text())


def test_uninterrupted_run_outputs(runs):
  rc, log, wd, pid = runs["a"]
  s = _summary(wd, pid)
  assert s["steps"] == STEPS and not s["preempted"] and s["resumed_from"] is None
  assert s["compiles"] == 1  # static shapes: one compile of the step for the whole run
  assert s["data"]["kept"] == N_RECORDS and s["data"]["skipped"] == 0
  assert np.isfinite(s["final_loss"])
  # the NaN image's batches were skipped and counted: one per step that drew record 3
  seq, _ = _steps(wd)
  assert len(seq) == STEPS and sorted(i for step in seq for i in step) == sorted(list(range(N_RECORDS)) * 2)
  nan_steps = sum(3 in step for step in seq)
  assert nan_steps == 2 and s["skipped"] == nan_steps
  assert "skipped non-finite updates 2" in log
  # outputs: checkpoints (keep 2), TensorBoard events, sample grids, loss curve
  assert sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()) == [4, 6]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tb")))
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]  # the same scalars
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and rows[-1]["skipped"] == 2
  assert rows[-1]["loss"] == pytest.approx(s["final_loss"])
  assert sorted(os.listdir(os.path.join(wd, "samples"))) == ["step_000003.png", "step_000006.png"]
  assert Image.open(os.path.join(wd, "samples", "step_000003.png")).size[0] > 24
  assert os.path.isfile(os.path.join(wd, "loss_curve.png"))


def test_tensorboard_scalars(runs):
  import struct

  from tensorboardX.proto import event_pb2
  _, _, wd, _ = runs["a"]
  tb = os.path.join(wd, "tb")
  path = os.path.join(tb, next(f for f in os.listdir(tb) if f.startswith("events")))
  tags = {}
  with open(path, "rb") as f:
    buf = f.read()
  pos = 0
  while pos < len(buf):  # TFRecord framing: length, crc, payload, crc
    (n,) = struct.unpack("<Q", buf[pos:pos + 8])
    ev = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in ev.summary.value:
      tags.setdefault(v.tag, []).append((ev.step, v.simple_value))
  for name in ("loss", "loss_reward", "loss_constraint", "reward_mean", "grad_norm", "lr", "skipped"):
    assert len(tags[f"train/{name}"]) == STEPS, name
  assert [v for _, v in tags["train/skipped"]][-1] == 2
  assert tags["train/lr"][0][1] == 0.0 and tags["train/lr"][-1][1] == pytest.approx(1e-3)


def test_kill_and_resume_reproduce_uninterrupted(runs):
  rc_b, _, wd, _ = runs["b"]
  assert rc_b == -signal.SIGKILL
  assert max(runs["b_steps"]) < STEPS - 1  # really killed mid-way
  assert runs["b_ckpts"] == [2]  # saves only every SAVE_EVERY steps (no extra initial save)
  rc_d, log_d, _, pd = runs["d"]
  assert rc_d == 0, log_d[-3000:]
  s = _summary(wd, pd)
  assert s["steps"] == STEPS and s["resumed_from"] >= 4 and not s["preempted"]
  a = np.load(os.path.join(runs["a"][2], "final_params.npz"))
  d = np.load(os.path.join(wd, "final_params.npz"))
  assert sorted(a.files) == sorted(d.files) and len(a.files) > 10
  for k in a.files:
    np.testing.assert_array_equal(a[k], d[k], err_msg=k)  # bit-exact
  seq_a, _ = _steps(runs["a"][2])
  seq_d, raw = _steps(wd)
  assert seq_d == seq_a
  assert len(raw) > STEPS  # steps after the restored checkpoints really were re-run
  assert s["skipped"] == _summary(runs["a"][2], runs["a"][3])["skipped"]
  # the CLI stage writes an exportable model dir: the final parameters, the source model's files
  _, exported = checkpoint.load_model_dir(os.path.join(wd, "model"))
  flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(exported)[0]}
  for k in a.files:
    np.testing.assert_array_equal(flat[k], d[k], err_msg=k)
  assert os.path.isfile(os.path.join(wd, "model", "tokenizer.json"))


def test_sigterm_saves_and_exits_cleanly(runs):
  rc, log, wd, pc = runs["c"]
  assert rc == 0, log[-3000:]
  s = _summary(wd, pc)
  assert s["preempted"] and s["resumed_from"] == 2 and 4 <= s["steps"] < STEPS
  meta = os.path.join(wd, "checkpoints", str(s["steps"]), "_CHECKPOINT_METADATA")
  assert os.path.isfile(meta)  # saved at the step it stopped
  assert f"preempted at step {s['steps']}" in log


def test_resume_with_nothing_left_keeps_the_summary(runs):
  """A resumed invocation that runs no step reports the training's last loss and total time, not null / 0."""
  rc, log, wd, pe = runs["e"]
  assert rc == 0, log[-3000:]
  e, a, d = _summary(wd, pe), _summary(runs["a"][2], runs["a"][3]), _summary(wd, runs["d"][3])
  assert e["steps"] == STEPS and e["resumed_from"] == STEPS and not e["preempted"]
  assert e["final_loss"] is not None and e["final_loss"] == d["final_loss"] == a["final_loss"]
  assert e["seconds"] >= d["seconds"] > d["seconds_this_invocation"] > 0
