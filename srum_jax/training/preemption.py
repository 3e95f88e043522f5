"""One preemption flag for every long loop: SIGTERM (TPU/GPU schedulers) and SIGINT (Ctrl-C) set it; the
loop polls it between steps, saves and returns instead of dying mid-write.

    with PreemptionFlag() as stop:
      for step in ...:
        if stop.is_set(): save(); break

Trainers take the flag to poll from their caller (`flag_or_installed`: a caller's flag as it is, else one
installed for the call); `training.loop.TrainLoop` polls it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

__all__ = ["PreemptionFlag", "flag_or_installed"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
  """Installs its handlers on entry (main thread only; elsewhere it is a flag that is never set by a
  signal) and restores the previous ones on exit. `set()` raises it by hand (tests, custom monitors)."""

  def __init__(self, signals=SIGNALS):
    self._event = threading.Event()
    self._signals = tuple(signals)
    self._previous = {}

  def is_set(self) -> bool:
    return self._event.is_set()

  def set(self) -> None:
    self._event.set()

  def __enter__(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, lambda signum, frame: self._event.set())
    return self

  def __exit__(self, *exc) -> bool:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}
    return False


@contextlib.contextmanager
def flag_or_installed(stop: Optional[PreemptionFlag]) -> Iterator[PreemptionFlag]:
  """`stop` as it is (the caller installed or raises it), or a `PreemptionFlag` installed for the block."""
  if stop is not None:
    yield stop
    return
  with PreemptionFlag() as flag:
    yield flag
