"""Run metrics: the console line, metrics.jsonl, TensorBoard events, and loss-curve plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np


class Logger:
  """One place for the console line, metrics.jsonl and TensorBoard events."""

  def __init__(self, model_dir: Path, enabled: bool):
    self.enabled = enabled
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(model_dir / "tb"))
      self.jsonl = open(model_dir / "metrics.jsonl", "a")

  def write(self, step: int, record: dict[str, Any], console: str | None = None) -> None:
    if not self.enabled:
      return
    if console:
      print(console, flush=True)
    self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
    self.jsonl.flush()
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
      self.writer.close()
      self.jsonl.close()


def summarize(metrics: list[dict]) -> dict[str, Any]:
  """Device metrics of several steps -> means (arrays kept as lists); expert load -> max/mean ratio too."""
  host = jax.device_get(metrics)
  out = {}
  for key in host[0]:
    if np.size(host[0][key]) == 0:  # e.g. a dense model's empty expert load
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


def plot_curves(path: Path, train_curve: list[tuple[int, float]], val_curve: list[tuple[int, float]], title: str):
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
  fig.savefig(path, dpi=120)
  plt.close(fig)



def read_curves(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """(train, validation) loss curves from metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
  train, val = {}, {}
  if path.exists():
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if "loss" in rec:
        train[rec["step"]] = rec["loss"]
      if "val_loss" in rec:
        val[rec["step"]] = rec["val_loss"]
  return sorted(train.items()), sorted(val.items())

