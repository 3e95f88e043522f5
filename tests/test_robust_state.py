"""Robust state on a shared workdir: the workdir lock, collision-free image names, logs that survive any
bytes, quiet progress output, counters that add up over resumed invocations, quoted launch commands."""
import io
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

import pytest

from srum_jax import errors, progress
from srum_jax.data.prompt_sources import PromptItem
from srum_jax.evaluation import image_folders
from srum_jax.pipeline import evaluate, run
from srum_jax.workdir import layout, locking, logs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments/tiny_pipeline.py")


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _write_lock(workdir, **holder):
  workdir.mkdir(parents=True, exist_ok=True)
  base = {"host": socket.gethostname(), "pid": _dead_pid(), "proc_start": None, "started": "2020-01-01T00:00:00Z",
          "command": "run"}
  (workdir / locking.LOCK_NAME).write_text(json.dumps(dict(base, **holder)))


# --- the workdir lock -----------------------------------------------------------------------------------------

def test_second_command_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  with locking.WorkdirLock(str(tmp_path), "run") as lock:
    assert lock.held and (tmp_path / locking.LOCK_NAME).is_file()
    with pytest.raises(locking.WorkdirBusy) as e:
      locking.WorkdirLock(str(tmp_path), "score").acquire()
    msg = str(e.value)
    assert socket.gethostname() in msg and f"pid {os.getpid()}" in msg and lock.me["started"] in msg
    assert "\n" not in msg
  assert not (tmp_path / locking.LOCK_NAME).exists()  # released
  with locking.WorkdirLock(str(tmp_path)) as again:
    assert again.held


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  _write_lock(tmp_path)
  with locking.WorkdirLock(str(tmp_path), "run") as lock:
    assert lock.held and lock.took_over["started"] == "2020-01-01T00:00:00Z"
    assert json.loads((tmp_path / locking.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert "took over" in capsys.readouterr().out
  # a live pid reused by another process (a different kernel start time) is stale too
  _write_lock(tmp_path, pid=os.getpid(), proc_start="1")
  with locking.WorkdirLock(str(tmp_path)) as lock:
    assert lock.took_over is not None
  # a holder on another host cannot be checked from here: refused
  _write_lock(tmp_path, host="some-other-host")
  with pytest.raises(locking.WorkdirBusy, match="some-other-host"):
    locking.WorkdirLock(str(tmp_path)).acquire()


TAKER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from srum_jax.workdir import locking
try:
  lock = locking.WorkdirLock(sys.argv[1]).acquire()
  print("won", flush=True)
  time.sleep(3)
  lock.release()
except locking.WorkdirBusy:
  print("busy", flush=True)
"""


def test_processes_racing_for_a_stale_lock_one_wins(tmp_path):
  _write_lock(tmp_path)
  procs = [subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE,
                            text=True) for _ in range(6)]
  outs = [p.communicate(timeout=60)[0].strip().splitlines()[-1] for p in procs]
  assert sorted(outs) == ["busy"] * 5 + ["won"], outs


def test_cli_refuses_a_busy_workdir_in_one_line(tmp_path, tiny_model_dir):
  with locking.WorkdirLock(str(tmp_path), "run"):
    p = subprocess.run([sys.executable, "-m", "srum_jax", "run", f"--config={TINY}",
                        f"--config.model.dir={tiny_model_dir}", f"--config.workdir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 2, p.stderr[-2000:]
  assert "Traceback" not in p.stderr and "is in use by run on host" in p.stderr
  assert len([line for line in p.stderr.splitlines() if line.startswith("error:")]) == 1
  assert not (tmp_path / "eval").exists()


# --- image file names -----------------------------------------------------------------------------------------

def test_image_names_distinct_for_ids_that_differ_in_replaced_characters():
  long_a, long_b = "x" * 120 + "a", "x" * 120 + "b"
  ids = ["a/b", "a_b", "a b", "a:b", "a\\b", long_a, long_b, "../../etc", ".hidden", "", "ü", "u"]
  names = [layout.image_file_name(i) for i in ids]
  assert len(set(names)) == len(ids)
  assert names == [layout.image_file_name(i) for i in ids]  # a pure function of the id (resume finds them)
  assert names[0].startswith("a_b-") and names[0].endswith(".png")
  for n in names:
    assert "/" not in n and "\\" not in n and not n.startswith(".") and len(n) <= 80 + 1 + 16 + 4


# --- logs that survive any bytes ------------------------------------------------------------------------------

def test_log_lines_not_utf8_or_torn_are_skipped_and_counted(tmp_path):
  log = logs.JsonlLog(str(tmp_path / "metadata.jsonl"))
  log.append({"id": "a", "prompt": "ein Würfel", "image_file": "images/a.png"})
  torn = (json.dumps({"id": "b", "prompt": "ein Würfel", "image_file": "x"}, ensure_ascii=False) + "\n").encode()
  with open(log.path, "ab") as f:
    f.write(b"\xff\xfe garbage\n")
    f.write(b'{"id": "no_file", "prompt": "p"}\n')  # a metadata row without image_file
    f.write(b'["not", "an", "object"]\n')
    f.write(torn[:torn.index("ü".encode()) + 1])  # a crash mid-write, inside the 2-byte character
  rep = logs.LogReport()
  rows = layout.read_metadata(str(tmp_path), rep)
  assert [r["id"] for r in rows] == ["a"]
  assert (rep.undecodable, rep.missing_field, rep.malformed) == (2, 1, 1) and rep.skipped == 4
  # appending after the torn line starts a line of its own: the new row is read back whole
  log.append({"id": "c", "prompt": "p", "image_file": "images/c.png"})
  rep = logs.LogReport()
  assert [r["id"] for r in layout.read_metadata(str(tmp_path), rep)] == ["a", "c"] and rep.skipped == 4
  # a batch of rows in one write (`extend`, what the stages log per batch), also after a torn line
  with open(log.path, "ab") as f:
    f.write(torn[:5])
  log.extend([{"id": k, "prompt": "p", "image_file": f"images/{k}.png"} for k in ("d", "e")])
  log.extend([])
  rep = logs.LogReport()
  assert [r["id"] for r in layout.read_metadata(str(tmp_path), rep)] == ["a", "c", "d", "e"] and rep.skipped == 5


def test_read_rows_keeps_one_row_per_id_and_counts_the_rest(tmp_path):
  for name, ids in (("regions.0.jsonl", ["a", "b"]), ("regions.1.jsonl", ["c", "a"])):
    for i in ids:
      logs.JsonlLog(str(tmp_path / name)).append({"id": i, "regions": [{"box": [0, 0, 1, 1], "area": 1}]})
  logs.JsonlLog(str(tmp_path / "regions.1.jsonl")).append({"id": "d", "regions": "garbage"})
  rep = logs.LogReport()
  rows = layout.read_regions(str(tmp_path), rep)
  assert sorted(r["id"] for r in rows) == ["a", "b", "c"] and rep.duplicate_id == 1 and rep.wrong_type == 1
  # the merged copy process 0 writes next to the per-process logs holds the same rows: not duplicates
  logs.JsonlLog(str(tmp_path / "regions.jsonl")).append({"id": "a", "regions": []})
  rep = logs.LogReport()
  assert len(layout.read_regions(str(tmp_path), rep)) == 3 and rep.duplicate_id == 1


def test_rows_of_the_wrong_type_are_skipped_and_counted(tmp_path):
  """Every reader checks its rows' field types: `"correct": "false"` (or "yes", null, 1) is not a verdict, a
  NaN or out-of-range score is not a score, a prompt must be a string; each such row is skipped and counted
  like a garbled line (and its item is judged or scored again)."""
  good = {"prompt": "a red circle", "category": "color", "judge": "oracle"}
  rows = [dict(good, id="ok", correct=False), dict(good, id="s", correct="false"), dict(good, id="y", correct="yes"),
          dict(good, id="n", correct=None), dict(good, id="one", correct=1), dict(good, id="p", prompt=3, correct=True)]
  logs.JsonlLog(str(tmp_path / "judgments.jsonl")).extend(rows)
  rep = logs.LogReport()
  judged = layout.read_judgments(str(tmp_path), rep)
  assert [r["id"] for r in judged] == ["ok"] and rep.wrong_type == 5 and rep.skipped == 5
  assert evaluate.table(judged)["overall"] == {"correct": 0, "total": 1, "accuracy": 0.0}
  rec = {"image_file": "images/a.png", "prompt": "p", "global_score": 0.5, "seq": 0,
         "regions": [{"box": [0, 0, 4, 4], "score": 0.5, "object": None}]}
  bad = [dict(rec, id="nan", global_score=float("nan")), dict(rec, id="big", global_score=2.0),
         dict(rec, id="str", global_score="0.5"), dict(rec, id="box", regions=[{"box": [0, 0, 4], "score": 0.5}]),
         dict(rec, id="rs", regions=[{"box": [0, 0, 4, 4], "score": True}]), dict(rec, id="seq", seq=True)]
  logs.JsonlLog(str(tmp_path / "rewards.jsonl")).extend([dict(rec, id="good")] + bad)
  rep = logs.LogReport()
  assert [r["id"] for r in layout.read_rewards(str(tmp_path), rep)] == ["good"] and rep.wrong_type == 6
  meta = {"prompt": "p", "image_file": "images/x.png", "seq": 0}
  logs.JsonlLog(str(tmp_path / "metadata.jsonl")).extend(
      [dict(meta, id="m"), dict(meta, id="f", image_file=None), dict(meta, id="q", prompt=["p"]),
       dict(meta, id="b", seq=False), {"id": "miss", "prompt": "p"}, {"id": 7, "prompt": "p", "image_file": "x"}])
  rep = logs.LogReport()
  assert [r["id"] for r in layout.read_metadata(str(tmp_path), rep)] == ["m"]
  assert (rep.wrong_type, rep.missing_field, rep.malformed) == (3, 1, 1)
  logs.JsonlLog(str(tmp_path / "metrics" / "mllm.jsonl")).extend(
      [{"id": "a", "prompt": "p", "score": 50.0}, {"id": "b", "prompt": "p", "score": "50"},
       {"id": "c", "prompt": "p", "score": None, "skipped": "image missing"}, {"id": "c", "prompt": "p", "score": 7}])
  rep = logs.LogReport()
  latest = layout.read_metric(str(tmp_path / "metrics"), "mllm", rep)
  assert {r["id"]: r["score"] for r in latest} == {"a": 50.0, "c": 7} and rep.wrong_type == 1


def test_a_folder_where_a_log_or_lock_file_belongs_is_named(tmp_path):
  (tmp_path / "metadata.jsonl").mkdir()
  with pytest.raises(errors.UserError, match="metadata.jsonl is a folder where a log file is expected"):
    layout.read_metadata(str(tmp_path))
  with pytest.raises(errors.UserError, match="is a folder"):
    logs.JsonlLog(str(tmp_path / "metadata.jsonl")).append({"id": "a"})
  (tmp_path / "w" / locking.LOCK_NAME).mkdir(parents=True)
  with pytest.raises(locking.WorkdirBusy, match="is a folder, not a lock file"):
    locking.WorkdirLock(str(tmp_path / "w")).acquire()
  (tmp_path / "v").mkdir()
  (tmp_path / "v" / locking.LOCK_NAME).write_bytes(b"")  # a creator that died before writing it
  with pytest.raises(locking.WorkdirBusy, match="if no command runs on this workdir, delete"):
    locking.WorkdirLock(str(tmp_path / "v")).acquire()
  old = time.time() - 2 * locking.UNREADABLE_STALE_S
  os.utime(tmp_path / "v" / locking.LOCK_NAME, (old, old))
  with locking.WorkdirLock(str(tmp_path / "v")) as lock:  # an old empty lock file is stale: taken over
    assert lock.held and lock.took_over == {}


# --- progress bars --------------------------------------------------------------------------------------------

def test_progress_off_a_terminal_writes_plain_lines_at_most_per_interval(monkeypatch):
  out = io.StringIO()  # not a terminal
  monkeypatch.setattr(sys, "stderr", out)
  bar = progress.bar(1000, "generate")
  for _ in range(1000):
    bar.update(1)
  bar.close()
  text = out.getvalue()
  assert "\r" not in text and len(text.splitlines()) <= 2, text  # the first frame (+ at most one more)
  assert "generate" in text.splitlines()[0]


# --- counters over resumed invocations ------------------------------------------------------------------------

def test_counters_add_up_over_invocations(tmp_path):
  path = tmp_path / "score_counters.json"
  first = run.accumulate_counters(path, {"images": 5, "skipped_done": 0, "scored": 3, "retries": 2})
  again = run.accumulate_counters(path, {"images": 5, "skipped_done": 3, "scored": 2, "retries": 0})
  done = run.accumulate_counters(path, {"images": 5, "skipped_done": 5, "scored": 0, "retries": 0})
  assert first["scored"] == 3 and again["scored"] == 5 and done["scored"] == 5 and done["retries"] == 2
  assert done["images"] == 5 and done["skipped_done"] == 5 and done["invocations"] == 3


# --- launch scripts -------------------------------------------------------------------------------------------

def _remote_command(args, env):
  out = subprocess.run(["bash", "launch/tpu.sh", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **env))
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  return next(a for a in argv if a.startswith("--command="))[len("--command="):]


def test_launch_values_with_spaces_and_semicolons_stay_one_word():
  for script in ("launch/tpu.sh", "launch/gpu.sh"):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
  env = {"REPO_URL": "https://example.com/a b;touch x", "REPO_DIR": "~/my dir;echo pwned"}
  words = shlex.split(_remote_command(["setup", "--dry_run"], env))
  assert words[:3] == ["git", "clone", "https://example.com/a b;touch x"]
  assert "~/my dir;echo pwned" in words and "pwned" not in words and "x" not in words
  assert _remote_command(["setup", "--dry_run"], {}).split()[2:3] == ["REPO_URL"]
  assert shlex.split(_remote_command(["run", "--dry_run", "--", "run", "--config=a b.py"], env))[:2] == \
      ["cd", "~/my dir;echo pwned"]
  assert "~/srum_jax/srum_run.log" in _remote_command(["logs", "--dry_run"], {})  # ~ still expands remotely


def test_images_copied_out_under_their_own_names_still_match_their_prompts(tmp_path):
  """A flat folder of the generate stage's files (no metadata) is matched through the names' hashes."""
  items = [PromptItem("a/b", "a cube", "shape"), PromptItem("a_b", "a ball", "shape")]
  for image_id in ("a/b", "a_b#1"):
    (tmp_path / layout.image_file_name(image_id)).write_bytes(b"")
  (tmp_path / "a_b-0123456789abcdef.png").write_bytes(b"")  # a hash that is not the id's: not matched
  rows, rep = image_folders.collect(str(tmp_path), items)
  assert sorted(r["id"] for r in rows) == ["a/b", "a_b#1"] and rep.unmatched_files == ["a_b-0123456789abcdef.png"]


def _two_process_propose(workdir):
  """`propose` (no model needed) as 2 JAX processes of one run sharing `workdir`: (exit codes, outputs)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-m", "srum_jax", "propose", f"--config={TINY}",
                             f"--config.workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                                     SRUM_NUM_PROCESSES="2", SRUM_PROCESS_ID=str(k),
                                     SRUM_COORDINATOR=f"127.0.0.1:{port}")) for k in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_one_multi_process_run_shares_the_lock_and_stops_together(tmp_path):
  """Process 0 of a run takes the lock for every process of it; when it cannot, all of them stop (exit 2)."""
  codes, outs = _two_process_propose(tmp_path)
  assert codes == [0, 0], outs
  assert not (tmp_path / locking.LOCK_NAME).exists()  # released at the end
  with locking.WorkdirLock(str(tmp_path), "run"):
    codes, outs = _two_process_propose(tmp_path)
  assert codes == [2, 2], outs
  assert "is in use by run on host" in outs[0] and "process 0 could not take its lock" in outs[1]
  assert not any("Traceback" in o for o in outs)
