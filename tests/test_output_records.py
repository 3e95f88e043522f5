"""A workdir never mixes two runs: every stage output records what made it (model identity, seed, the stage's
settings, its inputs), a command that would make it differently stops before any work (exit 2, one line naming
what differs and the ways out) or, with `discard_stale`, deletes it and what was made from it; a resume makes
again the images whose files went missing or were damaged; a stopped training exits 75."""
import json
import os
import pathlib
import shutil

import pytest

from srum_jax import cli, errors, files
from srum_jax.pipeline import commands
from srum_jax.pretrain import stages as pretrain_stages
from srum_jax.workdir import fingerprints, layout, logs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments/tiny_pipeline.py")


def _unit(directory, stem="metadata", outputs=(), **made_by):
  return fingerprints.Unit(str(directory), stem, dict(stage="x", **made_by), f"stage {stem}", tuple(outputs))


def test_claim_records_refuses_other_configs_and_discards_what_was_made_from_them(tmp_path):
  gen = _unit(tmp_path / "gen", seed=42, settings={"steps": 16})
  fingerprints.claim([gen], str(tmp_path))  # nothing there yet: the record is written
  assert json.loads((tmp_path / "gen" / "metadata.made_by.json").read_text())["fingerprint"] == gen.fingerprint
  logs.JsonlLog(str(tmp_path / "gen" / "metadata.jsonl")).append({"id": "a"})
  fingerprints.claim([gen], str(tmp_path))  # the same configuration resumes
  prop = _unit(tmp_path / "prop", stem="regions", inputs={"generate": gen.fingerprint})
  fingerprints.claim([prop], str(tmp_path))
  logs.JsonlLog(str(tmp_path / "prop" / "regions.jsonl")).append({"id": "a"})
  other = _unit(tmp_path / "other", stem="regions", inputs={"generate": "another"})
  fingerprints.claim([other], str(tmp_path))
  logs.JsonlLog(str(tmp_path / "other" / "regions.jsonl")).append({"id": "a"})
  new = _unit(tmp_path / "gen", seed=7, settings={"steps": 4})
  with pytest.raises(fingerprints.StaleOutputs) as e:
    fingerprints.claim([new], str(tmp_path))
  msg = str(e.value)
  assert "seed: 42 -> 7" in msg and "settings.steps: 16 -> 4" in msg and "discard_stale=True" in msg
  assert "new workdir" in msg and "\n" not in msg
  assert (tmp_path / "gen" / "metadata.jsonl").is_file()  # nothing touched
  fingerprints.claim([new], str(tmp_path), discard_stale=True)
  assert not (tmp_path / "gen" / "metadata.jsonl").exists()
  assert not (tmp_path / "prop" / "regions.jsonl").exists()  # made from the discarded outputs: gone too
  assert (tmp_path / "other" / "regions.jsonl").is_file()  # made from something else: kept
  assert fingerprints.fingerprint_of(str(tmp_path / "gen"), "metadata") == new.fingerprint
  # outputs without a record (made before records existed) are not trusted either
  logs.JsonlLog(str(tmp_path / "old" / "metadata.jsonl")).append({"id": "a"})
  with pytest.raises(fingerprints.StaleOutputs, match="hold no record of what made them"):
    fingerprints.claim([_unit(tmp_path / "old")], str(tmp_path))
  # a file where the unit's folder belongs is named
  (tmp_path / "g2").mkdir()
  (tmp_path / "g2" / "images").write_text("x")
  with pytest.raises(NotADirectoryError) as e:
    fingerprints.claim([_unit(tmp_path / "g2", outputs=("images/",))], str(tmp_path))
  assert "a file is in the way" in errors.os_error_line(e.value) and "images" in errors.os_error_line(e.value)


def _main(capsys, *args):
  """(exit code, stderr lines, stdout) of the CLI run in this process."""
  rc = cli.main(["srum_jax", *args])
  out = capsys.readouterr()
  return rc, [ln for ln in out.err.splitlines() if ln.strip()], out.out


def _touched_copy(model_dir, dst):
  """The model dir copied with new modification times: another model as far as identities go."""
  shutil.copytree(model_dir, dst, copy_function=shutil.copyfile)
  return str(dst)


def test_stage_commands_refuse_outputs_of_another_run_and_remake_missing_files(tiny_model_dir, tmp_path, capsys):
  """The issue's reproductions, in process: generate with another seed / flow steps / model stops with exit 2
  before any work; a deleted or damaged PNG is made again on resume; `discard_stale` regenerates and drops
  what was made from the old images; eval under the same name with another model stops."""
  w = tmp_path / "work"
  base = [f"--config={TINY}", f"--config.model.dir={tiny_model_dir}", f"--config.workdir={w}"]
  rc, err, out = _main(capsys, "generate", *base)
  assert rc == 0, err
  gen = w / "generate"
  rows = layout.read_metadata(str(gen))
  assert len(rows) == 5 and {r["seed"] for r in rows} == {42}
  assert _main(capsys, "propose", *base)[0] == 0
  for extra, needle in ((["--config.seed=7"], "seed: 42 -> 7"),
                        (["--config.generate.num_timesteps=4"], "settings.num_timesteps: 3 -> 4"),
                        (["--config.prompts.train.kwargs.per_category=2"], "inputs.prompts"),
                        ([f"--config.model.dir={_touched_copy(tiny_model_dir, tmp_path / 'other')}"], "model: ")):
    rc, err, _ = _main(capsys, "generate", *base, *extra)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: generate outputs in"), (extra, err)
    assert needle in err[0] and "discard_stale=True" in err[0], (needle, err)
  assert [r["id"] for r in layout.read_metadata(str(gen))] == [r["id"] for r in rows]  # untouched
  # resume checks the files: a deleted and a damaged PNG are made again, bit for bit
  first = files.load_rgb(gen / rows[0]["image_file"])[0]
  os.remove(gen / rows[0]["image_file"])
  (gen / rows[1]["image_file"]).write_bytes(b"\x89PNG\r\n\x1a\n garbled")
  rc, err, out = _main(capsys, "generate", *base)
  assert rc == 0 and "redone_bad_files=2" in out and "generated=2" in out, (err, out)
  assert all(files.image_problem(gen / r["image_file"]) is None for r in rows)
  assert (files.load_rgb(gen / rows[0]["image_file"])[0] == first).all()
  rep = logs.LogReport()
  assert len(layout.read_metadata(str(gen), rep)) == 5 and rep.skipped == 0  # one row per image, the latest
  # discard_stale: the old images and the regions made from them go, the new run starts clean
  rc, err, out = _main(capsys, "generate", *base, "--config.seed=7", "--config.discard_stale=True")
  assert rc == 0, err
  assert {r["seed"] for r in layout.read_metadata(str(gen))} == {7} and len(layout.read_metadata(str(gen))) == 5
  assert not (w / "propose" / "regions.jsonl").exists() and "discarded stale outputs" in out
  # eval results are keyed by the model's identity as well as the name
  ev = [*base, "--config.eval.name=m", "--config.eval_generate.samples_per_prompt=1"]
  assert _main(capsys, "eval", *ev)[0] == 0
  rc, err, _ = _main(capsys, "eval", *ev, f"--config.eval.model_dir={tmp_path / 'other'}")
  assert rc == 2 and len(err) == 1 and "eval 'm' images outputs" in err[0] and "model: " in err[0], err
  rc, err, _ = _main(capsys, "eval", *ev, "--config.eval.name=m2", f"--config.eval.model_dir={tmp_path / 'other'}")
  assert rc == 0, err


def test_stopped_train_and_pretrain_exit_75_and_pretrain_takes_the_lock(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
  """A training stopped by a signal saves its state and exits 75 (EX_TEMPFAIL, as `run`), saying how to
  resume; `pretrain` holds the lock of its folder. (A real SIGTERM: tests/test_user_errors.py.)"""
  records = tmp_path / "rewards.jsonl"
  records.write_text(json.dumps({"image_file": "0.png", "prompt": "p", "global_score": 0.5, "regions": []}) + "\n")
  monkeypatch.setattr(commands.train, "main", lambda config, **kw: {"preempted": True, "steps": 3})
  rc, err, out = _main(capsys, "train", f"--config={TINY}", f"--config.model.dir={tiny_model_dir}",
                       f"--config.workdir={tmp_path / 'w'}", f"--config.train.records={records}")
  assert rc == commands.EXIT_PREEMPTED == 75 and "run the same command again to resume" in out, (err, out)
  monkeypatch.setattr(pretrain_stages, "pretrain_chain", lambda config: [{"preempted": True, "name": "AB"}])
  cfg = cli._parse("pretrain", ["srum_jax", "--config=experiments/tiny_world.py",
                                f"--config.pretrain.out={tmp_path / 'p'}"])[0]
  assert pretrain_stages.main(cfg, None) == 75
  with open(tmp_path / "p" / ".srum_lock.json", "w") as f:  # a live holder: this process
    json.dump({"host": os.uname().nodename, "pid": os.getpid(), "started": "now", "command": "run"}, f)
  assert pretrain_stages.main(cfg, None) == 2
  assert "is in use by run" in capsys.readouterr().err
