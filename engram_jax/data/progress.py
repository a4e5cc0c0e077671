"""A heartbeat for long silent steps (SentencePiece training inside the corpus build): a log line every few
seconds with the elapsed time, the input size and rate, and an ETA from an expected duration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

EVERY_S = 10.0  # seconds between heartbeat lines


def _clock(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  return f"{seconds // 60}m{seconds % 60:02d}s"


class Heartbeat:
  """`with Heartbeat(log, 'corpus: SentencePiece', size_mb=12.0, expected_s=18.0):` logs
  'corpus: SentencePiece | 12.0 MB | 0m10s elapsed | ETA ~0m08s (planned 0.67 MB/s)' every EVERY_S seconds from a
  background thread, and on exit 'corpus: SentencePiece done: 12.0 MB in 0m19s (0.63 MB/s)'."""

  def __init__(self, log: Callable[[str], None], label: str, *, size_mb: float, expected_s: float,
               every: float | None = None):
    self.log, self.label, self.size_mb, self.expected_s = log, label, size_mb, max(expected_s, 1e-9)
    self.every = EVERY_S if every is None else every
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.t0 = 0.0

  def line(self, elapsed: float) -> str:
    left = self.expected_s - elapsed
    eta = f"ETA ~{_clock(left)}" if left > 0 else "ETA: any moment (slower than planned)"
    return (f"{self.label} | {self.size_mb:.1f} MB | {_clock(elapsed)} elapsed | {eta} "
            f"(planned {self.size_mb / self.expected_s:.2f} MB/s)")

  def _run(self) -> None:
    while not self._stop.wait(self.every):
      self.log(self.line(time.perf_counter() - self.t0))

  def __enter__(self) -> Heartbeat:
    self.t0 = time.perf_counter()
    self._thread = threading.Thread(target=self._run, name="engram_heartbeat", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, exc_type, *_) -> None:
    self._stop.set()
    self._thread.join()
    if exc_type is None:
      seconds = time.perf_counter() - self.t0
      self.log(f"{self.label} done: {self.size_mb:.1f} MB in {_clock(seconds)} "
               f"({self.size_mb / max(seconds, 1e-9):.2f} MB/s)")
