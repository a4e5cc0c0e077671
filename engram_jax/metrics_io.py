"""Run metrics: the console line, metrics.jsonl, TensorBoard events, and loss-curve plots."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from engram_jax import fileio


class Logger:
  """One place for the console line, metrics.jsonl and TensorBoard events (process 0 only).

  metrics.jsonl gets one whole line per record (a single append); a line torn by an earlier crash is closed
  first, so it stays a line of its own that readers skip. Non-finite numbers are written as null (strict JSON).
  On an object store (gs://), where files cannot be appended to, the whole file is rewritten per record."""

  def __init__(self, model_dir, enabled: bool):
    self.enabled = enabled
    self.writer = None
    if not enabled:
      return
    self.path = fileio.as_path(model_dir) / "metrics.jsonl"
    self.remote = fileio.is_remote(self.path)
    text = self.path.read_text() if self.path.exists() else ""
    if self.remote:
      self.lines = text.splitlines(keepends=True)
    else:
      self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      if text and not text.endswith("\n"):
        os.write(self.fd, b"\n")
    if self.remote:  # tensorboardX needs extra packages for object stores; metrics.jsonl holds every value
      print(f"note: no TensorBoard events for {model_dir} (written for local MODEL_DIRs only)", flush=True)
    else:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(fileio.as_path(model_dir) / "tb"))

  def write(self, step: int, record: dict[str, Any], console: str | None = None) -> None:
    if not self.enabled:
      return
    if console:
      print(console, flush=True)
    line = json.dumps(fileio.finite_json({"step": step, **record})) + "\n"
    if self.remote:
      self.lines.append(line)
      fileio.atomic_write(self.path, "".join(self.lines))
    else:
      os.write(self.fd, line.encode("utf-8"))
    if self.writer is None:
      return
    for key, value in record.items():
      arr = None if value is None or isinstance(value, str) else np.asarray(value, dtype=np.float64)
      if arr is None:
        continue
      if arr.ndim == 0:
        self.writer.add_scalar(key, float(arr), step)
      else:
        self.writer.add_histogram(key, arr.reshape(-1), step)
        self.writer.add_scalar(key + "/mean", float(arr.mean()), step)

  def close(self) -> None:
    if self.enabled:
      if self.writer is not None:
        self.writer.close()
      if not self.remote:
        os.close(self.fd)
      self.enabled = False


def summarize(metrics: list[dict]) -> dict[str, Any]:
  """Device metrics of several steps -> means (arrays kept as lists); expert load -> max/mean ratio too."""
  host = jax.device_get(metrics)
  out = {}
  for key in host[0]:
    if key.startswith("guard/") or np.size(host[0][key]) == 0:  # guard flags; e.g. a dense model's empty load
      continue
    values = np.mean([np.asarray(m[key], np.float64) for m in host], axis=0)
    out[key] = values.tolist() if np.ndim(values) else float(values)
    if key == "aux/expert_load" and np.ndim(values) == 2:  # [L, E] fractions
      out["aux/max_over_mean_load"] = float(np.mean(values.max(-1) / np.maximum(values.mean(-1), 1e-9)))
  return out


def moe_engram_text(record: dict) -> str:
  """' | load max/mean 1.31 | gate 0.47' when the model has MoE / Engram layers."""
  text = ""
  if "aux/max_over_mean_load" in record:
    text += f" | load max/mean {record['aux/max_over_mean_load']:.2f}"
  if "aux/engram_gate_mean" in record:
    text += f" | gate {np.mean(record['aux/engram_gate_mean']):.2f}"
  return text


def duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def plot_curves(path, train_curve: list[tuple[int, float]], val_curve: list[tuple[int, float]], title: str):
  """Train and validation loss against step, as a PNG at `path` (local or gs://), written atomically."""
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  if train_curve:
    ax.plot(*zip(*train_curve), label="train", alpha=0.7)
  if val_curve:
    ax.plot(*zip(*val_curve), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  fileio.atomic_write(path, buf.getvalue())


def read_records(path) -> list[dict]:
  """The records of a metrics.jsonl; unreadable (torn) lines are skipped with a warning naming their number."""
  path = fileio.as_path(path)
  if not path.exists():
    return []
  records, bad = [], []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      bad.append(i)
  if bad:
    print(f"warning: {path}: skipped {len(bad)} unreadable line(s) {bad[:5]} (a record torn by a crash)", flush=True)
  return records


def read_curves(path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """(train, validation) loss curves from metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
  train, val = {}, {}
  for rec in read_records(path):
    if rec.get("loss") is not None:
      train[rec["step"]] = rec["loss"]
    if rec.get("val_loss") is not None:
      val[rec["step"]] = rec["val_loss"]
  return sorted(train.items()), sorted(val.items())
