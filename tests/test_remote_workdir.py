"""A `gs://` workdir (issue 15): the stages' workdir I/O through etils.epath on a fake object store that refuses
appends and exclusive creates (`fake_gcs.py`), so every check here runs the object-store code paths: part-object
logs folded by their writer, the best-effort lock, whole-object writes, and the local cache for files that must
be local. No network, no model: fast."""
import json
import os

import numpy as np
import pytest

from srum_jax import defaults, files, paths
from srum_jax.engine import loaded_model
from srum_jax.pipeline import propose, train_records
from srum_jax.rewards import records as records_lib
from srum_jax.training import checkpointing
from srum_jax.training.metrics_sink import MetricsSink
from srum_jax.workdir import layout, locking, logs

from fake_gcs import fake_gcs

RUN = "gs://bucket/run"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """`gs://bucket/...` stored under tmp_path/store; the cwd is an empty folder, checked at the end to prove no
  path was taken for a local one (`open("gs://b/x")` would land in `./gs:/b/x`)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(locking, "REMOTE_SETTLE_S", 0.0)
  with fake_gcs(str(tmp_path / "store")) as fs:
    yield fs
  assert os.listdir(cwd) == []
  assert not any("a" in m or "x" in m for m in fs.opened)


def _store(fs, url: str) -> str:
  return os.path.join(fs.root, url[len("gs://"):])


def test_log_on_object_store_is_part_objects_folded_by_its_writer(gcs, monkeypatch):
  monkeypatch.setattr(logs.JsonlLog, "COMPACT_EVERY", 3)
  log = logs.process_log(f"{RUN}/generate", "metadata")
  assert log.remote
  for i in range(7):  # folds after parts 3 and 6 of this writer
    log.append({"id": f"i{i}", "seq": i})
  assert len(log._parts()) == 1 and log.path.is_file()
  assert [r["id"] for r in log.rows()] == [f"i{i}" for i in range(7)]
  # a fold interrupted between writing <path> and deleting the parts: every row is still read once
  log.append({"id": "i7", "seq": 7})
  data_before, parts = log._remote_bytes()
  log.path.write_bytes(data_before)  # the fold's first step only
  assert len(log._parts()) == 2
  rep = logs.LogReport()
  rows = logs.read_rows(f"{RUN}/generate", "metadata", report=rep)
  assert [r["id"] for r in rows] == [f"i{i}" for i in range(8)] and rep.skipped == 0
  # the next writer (a resume) folds what is left: one object, every row once
  again = logs.process_log(f"{RUN}/generate", "metadata")
  assert again._parts() == [] and again.done() == {f"i{i}" for i in range(8)}


def test_read_rows_merges_per_process_logs_that_have_only_parts(gcs):
  d = f"{RUN}/propose"
  for p, ids in ((0, [0, 2, 4]), (1, [1, 3])):
    log = logs.JsonlLog(f"{d}/regions.{p}.jsonl")
    for i in ids:
      log.append({"id": f"i{i}", "seq": i, "regions": []})
  assert logs.log_paths(d, "regions") == [f"{d}/regions.0.jsonl", f"{d}/regions.1.jsonl"]
  assert [r["id"] for r in logs.read_rows(d, "regions")] == [f"i{i}" for i in range(5)]
  # one process's score log is folded at the stage's end, so plain file readers see every record
  log = logs.JsonlLog(f"{RUN}/score/rewards.jsonl")
  rec = records_lib.RewardRecord(image_file="images/a.png", prompt="a red cube", global_score=0.5)
  log.append(dict(rec.to_dict(), id="a"))
  logs.merge_process_logs(f"{RUN}/score", "rewards")
  recs, rep = records_lib.read_records(f"{RUN}/score/rewards.jsonl")
  assert [r.prompt for r in recs] == ["a red cube"] and not rep.skipped


def test_lock_on_object_store_is_best_effort_but_excludes_a_later_command(gcs, capsys):
  with locking.WorkdirLock(RUN, "run") as lock:
    assert lock.held
    assert "best effort" in capsys.readouterr().out
    with pytest.raises(locking.WorkdirBusy, match="in use by run"):
      locking.WorkdirLock(RUN, "train").acquire()
  assert not paths.path(f"{RUN}/{locking.LOCK_NAME}").exists()
  # a lock left by a dead process on this host is taken over, as on a local disk
  stale = {"host": locking.socket.gethostname(), "pid": 2 ** 22 + 12345, "started": "then", "command": "old"}
  paths.path(f"{RUN}/{locking.LOCK_NAME}").write_bytes(json.dumps(stale).encode())
  with locking.WorkdirLock(RUN, "new") as lock:
    assert lock.took_over == stale
    assert not paths.path(f"{RUN}/{locking.LOCK_NAME}.takeover").exists()


def _generated(n: int) -> str:
  """A generate stage's output on the object store: n images and their metadata rows."""
  gen = f"{RUN}/round_0/generate"
  log = logs.process_log(gen, "metadata")
  rng = np.random.default_rng(0)
  for i in range(n):
    rel = f"images/{layout.image_file_name(f'p{i}')}"
    files.save_png(paths.join(gen, rel), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    log.append({"id": f"p{i}", "seq": i, "prompt": f"prompt {i}", "image_file": rel})
  return gen


def test_propose_killed_and_resumed_on_object_store_does_every_item_once(gcs, monkeypatch):
  gen, out = _generated(6), f"{RUN}/round_0/propose"
  pcfg = defaults.base_config().propose
  pcfg.name, pcfg.batch_size = "grid", 3
  real = propose.get_proposer
  calls = []

  def crashing(*args, **kwargs):
    proposer = real(*args, **kwargs)
    candidates = proposer.candidates

    def run(image):
      calls.append(1)
      if len(calls) == 4:
        raise KeyboardInterrupt  # killed mid-stage, in the second batch: the first 3 are logged
      return candidates(image)
    proposer.candidates = run
    return proposer

  monkeypatch.setattr(propose, "get_proposer", crashing)
  with pytest.raises(KeyboardInterrupt):
    propose.propose(pcfg, gen, out)
  assert len(logs.read_rows(out, "regions")) == 3
  rep = propose.propose(pcfg, gen, out)
  assert (rep.skipped_done, rep.proposed, rep.skipped_bad_image) == (3, 3, 0)
  log_rep = logs.LogReport()
  rows = layout.read_regions(out, log_rep)
  assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)] and log_rep.skipped == 0
  assert [r["id"] for r in layout.read_metadata(gen)] == [f"p{i}" for i in range(6)]


def test_images_json_and_records_are_whole_objects(gcs):
  files.write_json(f"{RUN}/report/report.json", {"a": 1})
  assert json.loads(paths.path(f"{RUN}/report/report.json").read_text()) == {"a": 1}
  files.save_png(f"{RUN}/report/grid.png", np.zeros((4, 5, 3), np.uint8))
  im, why = files.load_rgb(f"{RUN}/report/grid.png")
  assert im.shape == (4, 5, 3) and why is None
  assert files.load_rgb(f"{RUN}/report/none.png") == (None, "missing")
  recs = [records_lib.RewardRecord(image_file="a.png", prompt="p", global_score=1.0)]
  assert records_lib.write_records(f"{RUN}/x/r.jsonl", recs) == 1
  assert records_lib.read_records(f"{RUN}/x/r.jsonl")[0] == recs
  assert not any(n.endswith(".tmp") or ".tmp" in n for n in os.listdir(_store(gcs, f"{RUN}/report")))


def test_prepare_records_from_object_store_into_the_local_cache(gcs, tmp_path):
  gen = _generated(3)
  rows = logs.read_rows(gen, "metadata")
  recs = [records_lib.RewardRecord(image_file=r["image_file"], prompt=r["prompt"], global_score=0.5,
                                   regions=(records_lib.RegionReward((0, 0, 8, 8), 0.5, "cube"),),
                                   metadata={"id": r["id"]}) for r in rows]
  recs.append(records_lib.RewardRecord(image_file="images/gone.png", prompt="p", global_score=0.5,
                                       metadata={"id": "gone"}))
  records_lib.write_records(f"{RUN}/score/rewards.jsonl", recs)
  path, report = train_records.prepare_records(f"{RUN}/score/rewards.jsonl", gen, f"{RUN}/train/data", max_regions=4)
  assert path.startswith(str(tmp_path / "cache")) and os.path.isfile(path)  # ArrayRecord needs a local file
  assert report.kept == 3 and report.missing_image == 1
  again, _ = train_records.prepare_records(f"{RUN}/score/rewards.jsonl", gen, f"{RUN}/train/data", max_regions=4)
  assert again == path  # the same inputs reuse the cached file


def test_checkpoint_listing_moves_and_local_copies(gcs):
  ck = f"{RUN}/train/checkpoints"
  for step, done in ((1, True), (2, True), (3, False)):
    paths.write_bytes(f"{ck}/{step}/state/x", b"0")
    if done:
      paths.write_bytes(f"{ck}/{step}/_CHECKPOINT_METADATA", b"{}")
  assert checkpointing.finished_steps(ck) == [1, 2]
  assert paths.abspath(ck) == ck  # orbax gets gs:// untouched
  paths.move_tree(f"{ck}/2", f"{ck}_invalid/2")
  assert checkpointing.finished_steps(ck) == [1]
  assert paths.path(f"{ck}_invalid/2/state/x").read_bytes() == b"0"
  paths.write_bytes(f"{RUN}/model/tokenizer.json", b'{"t": 1}')
  local = paths.local_copy(f"{RUN}/model/tokenizer.json")
  assert not paths.is_remote(local) and open(local, "rb").read() == b'{"t": 1}'
  assert loaded_model.dir_identity(f"{RUN}/model") == loaded_model.dir_identity(f"{RUN}/model")


def test_tpu_launch_passes_a_gs_workdir():
  import pathlib
  import subprocess
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(["bash", "launch/tpu.sh", "run", "--dry_run", "--", "run", "--config=experiments/x.py"],
                       cwd=root, capture_output=True, text=True, env=dict(os.environ, WORKDIR="gs://b/srum/run1"))
  assert out.returncode == 0, out.stderr
  assert "--config.workdir=gs://b/srum/run1" in out.stdout
  setup = subprocess.run(["bash", "launch/tpu.sh", "setup", "--dry_run"], cwd=root, capture_output=True, text=True)
  assert "gcsfs" in setup.stdout


def test_train_side_logs_on_object_store(gcs, monkeypatch):
  """The one remote-log policy for training's logs: the data log's rows are kept and written as one part
  object at most every FLUSH_S seconds and on close (read back as a JsonlLog); the metrics sink's rows
  too, and its TensorBoard events are written locally and copied to <workdir>/tb at those moments."""
  with logs.BufferedLog(logs.process_log(f"{RUN}/train", "data_log")) as log:
    log.append({"step": 5})  # the first flush writes at once; later ones at most every FLUSH_S seconds
    log.append({"step": 6})
    assert len(log.log._parts()) == 1 and log.rows == [{"step": 6}]
  assert [json.loads(line) for line in log.log._remote_bytes()[0].splitlines()] == [{"step": 5},
                                                                                   {"step": 6}]
  again = logs.process_log(f"{RUN}/train", "data_log")  # the next invocation's writer folds the parts in
  assert again._parts() == [] and paths.path(f"{RUN}/train/data_log.jsonl").read_text().count("step") == 2
  with MetricsSink(f"{RUN}/train") as sink:
    sink.write("train", 1, {"loss": 1.0})
    sink.write("train", 2, {"loss": 0.5})
  events = [p.name for p in paths.path(f"{RUN}/train/tb").iterdir()]
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  rows = logs.JsonlLog(f"{RUN}/train/metrics.jsonl")._remote_bytes()[0].splitlines()
  assert [json.loads(r)["loss"] for r in rows] == [1.0, 0.5]
