"""Training checkpoints: an orbax `CheckpointManager` holding the whole resumable state of a run.

Per step directory `<dir>/<step>/`:
  state/  {params, opt_state, ema (when used), step, skipped, key (PRNG key data)} (orbax PyTree,
          sharded)
  data/   the grain iterator state, one JSON file per process (grain's orbax handler)
  meta/   JSON: step, skipped, wall time, anything the caller adds
Saves are asynchronous (the device -> host copy happens inside `save`, the writes in the
background); `save_interval_steps` / `max_to_keep` come from the config; `force=True` saves off the
interval (final and SIGTERM saves). Restoring places every leaf directly onto the target shardings
of an abstract state.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Tuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from srum_jax import distributed, paths
from srum_jax.training.update import TrainState

__all__ = ["Checkpointer", "abstract_with_shardings", "finished_steps", "restore_params"]


class _IteratorSnapshot:
  """The grain iterator's state captured when `save` is called (grain's handler may run later, in
  orbax's background thread, when the live iterator has moved on). Speaks the byte-state protocol of
  grain's `CheckpointHandler` for both save and restore."""

  def __init__(self, state: Optional[dict] = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state, indent=1).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state.decode() if isinstance(state, bytes) else state)

  def start_prefetch(self) -> None:  # called by grain's handler after set_state
    pass


def _state_tree(state: TrainState, key_data) -> dict:
  tree = {
      "params": state.params,
      "opt_state": state.opt_state,
      "step": state.step,
      "skipped": state.skipped
  }
  if key_data is not None:
    tree["key"] = key_data
  if state.ema is not None:
    tree["ema"] = state.ema
  return tree


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for `TrainState` + key data + data-iterator state."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = paths.abspath(directory)  # orbax takes a gs:// directory as it is
    # Only the interval (orbax's default policy would also save the first step of a fresh run: a
    # full 7B state for nothing); off-interval saves (final, SIGTERM) use force=True.
    policy = ocp.checkpoint_managers.FixedIntervalPolicy(max(1, int(save_interval_steps)))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_decision_policy=policy,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def save(self, step: int, state: TrainState, *, key_data=None, data_state: Optional[dict] = None,
           meta: Optional[dict] = None, force: bool = False) -> bool:
    """Save at `step` when the interval says so (or `force`); returns whether a save started.

    A step that already has a checkpoint is never saved twice (e.g. SIGTERM right after a periodic
    save).
    """
    step = int(step)
    if step in self._mngr.all_steps() or not (force or self._mngr.should_save(step)):
      return False
    items = {"state": ocp.args.StandardSave(_state_tree(state, key_data)),
             "meta": ocp.args.JsonSave(dict(meta or {}, step=step, time=time.time()))}
    if data_state is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
    return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

  def restore(self, step: Optional[int], abstract_state: TrainState, key_data=None
              ) -> Tuple[TrainState, Any, Optional[dict], dict]:
    """(state, key_data, data-iterator state or None, meta) at `step` (None: latest).

    `abstract_state` / `key_data` give structure, dtypes and target shardings (ShapeDtypeStructs
    with `sharding`, e.g. from `abstract_with_shardings`); leaves are read straight onto those
    shardings.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(_state_tree(abstract_state, key_data)),
             "meta": ocp.args.JsonRestore()}
    has_data = paths.path(os.path.join(self.directory, str(step), "data")).is_dir()
    if has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot())
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    tree = out["state"]
    state = TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                       ema=tree.get("ema"), skipped=tree["skipped"])
    data_state = out["data"].state if has_data else None
    return state, tree.get("key"), data_state, dict(out["meta"])

  def restore_latest_good(self, abstract_state: TrainState, key_data=None, *,
                          require_data: bool = True) -> Tuple[Optional[int], Optional[tuple], list]:
    """(step, `restore`'s tuple, the steps given up) of the newest step that restores, or (None,
    None, given up) when none does. A step whose files are truncated or corrupt (its restore
    raises), or that lacks this process's data-iterator state when `require_data`, is moved aside to
    `<dir>_invalid/<step>` (so the run saves that step again) and the previous one is tried; each is
    printed. Several processes agree on each step (a step is given up when any process cannot
    restore it)."""
    given_up = []
    for step in sorted(self.all_steps(), reverse=True):
      why = None
      if require_data and not paths.path(
          os.path.join(self.directory, str(step), "data",
                       _data_file(jax.process_index(), jax.process_count()))).is_file():
        why = "no data-iterator state (its data order would be lost)"
      else:
        try:
          got = self.restore(step, abstract_state, key_data)
        except Exception as e:  # orbax / tensorstore / json raise many types for damaged files
          why = f"{type(e).__name__}: {str(e)[:300]}"
      if not distributed.any_process(why is not None):
        return step, got, given_up
      given_up.append((step, why or "another process could not restore it"))
      print(
          f"[checkpoint] step {step} in {self.directory} cannot be restored ({given_up[-1][1]}); "
          f"moved aside, "
          f"trying the previous step", flush=True)
      self._set_aside(step)
    return None, None, given_up

  def _set_aside(self, step: int) -> None:
    """Move step `step` out of the manager's directory (process 0; every process then reloads the
    step list). On an object store the move is a copy, then a delete (`paths.move_tree`)."""
    if distributed.is_main():
      aside = self.directory + "_invalid"
      paths.path(aside).mkdir(parents=True, exist_ok=True)
      dst = os.path.join(aside, str(step))
      if paths.path(dst).exists():
        dst = f"{dst}.{int(time.time())}"
      paths.move_tree(os.path.join(self.directory, str(step)), dst)
    distributed.barrier(f"checkpoint_set_aside:{self.directory}:{step}")
    self._mngr.reload()

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """The JSON meta saved with `step` (None: latest), without reading the state."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return dict(
        self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


def _data_file(process_index: int, process_count: int) -> str:
  """The file grain's checkpoint handler writes for one process's iterator state."""
  return f"process_{process_index}-of-{process_count}.json"


def finished_steps(directory: str) -> list:
  """Steps with a finished checkpoint in `directory` (none when it does not exist), ascending;
  nothing is created. Local or remote (gs://)."""
  root = paths.path(directory)
  if not root.is_dir():
    return []
  return sorted(
      int(p.name)
      for p in root.iterdir()
      if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file())


def restore_params(directory: str, step: Optional[int] = None, abstract_params=None):
  """Trained parameters ({'bagel', 'ae'}) from a training checkpoint directory, e.g. for export.

  `abstract_params`: ShapeDtypeStructs (with shardings) to restore onto; None restores as stored
  (NumPy on the host when the stored sharding cannot be rebuilt).
  """
  directory = paths.abspath(directory)
  if step is None:
    steps = finished_steps(directory)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1]
  path = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as ckpt:
    if abstract_params is None:
      meta = ckpt.metadata(path).item_metadata.tree
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta["params"])
      args = ocp.args.PyTreeRestore(
          item={"params": target}, restore_args={
              "params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
          }, partial_restore=True)
    else:
      args = ocp.args.PyTreeRestore(
          item={"params": abstract_params}, restore_args={
              "params": jax.tree.map(
                  lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                  abstract_params)
          }, partial_restore=True)
    return ckpt.restore(path, args=args)["params"]
