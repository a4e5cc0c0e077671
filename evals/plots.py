"""Pictures of eval results: PNGs (matplotlib, Agg) and the gate HTML page. Each function writes one file."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evals.report import atomic_write


def _figure(w: float, h: float):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt, plt.subplots(figsize=(w, h))


def _save(plt, fig, path: Path) -> Path:
  import io
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  return atomic_write(path, buf.getvalue())


def scores_png(path: Path, tasks: dict[str, dict], title: str) -> Path:
  """Primary metric per task (with standard error bars, and Engram off when present) against chance."""
  names = [n for n, t in tasks.items() if t["primary"] != "bpb"]
  plt, (fig, ax) = _figure(max(6, 0.7 * len(names) + 2), 4)
  x = np.arange(len(names))
  has_off = any("engram_off" in tasks[n] for n in names)
  w = 0.4 if has_off else 0.7
  val = [tasks[n]["metrics"][tasks[n]["primary"]] for n in names]
  ax.bar(x - (w / 2 if has_off else 0), [100 * v["value"] for v in val], w,
         yerr=[100 * v["stderr"] for v in val], capsize=3, label="score")
  if has_off:
    off = [tasks[n].get("engram_off", {}).get(tasks[n]["primary"], {"value": np.nan, "stderr": 0}) for n in names]
    ax.bar(x + w / 2, [100 * v["value"] for v in off], w, yerr=[100 * v["stderr"] for v in off], capsize=3,
           label="Engram off")
  for i, n in enumerate(names):
    if tasks[n].get("chance") is not None:
      ax.hlines(100 * tasks[n]["chance"], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                label="chance" if i == 0 else None)
  ax.set_xticks(x, [f"{n}\n({tasks[n]['primary']})" for n in names], rotation=45, ha="right", fontsize=7)
  ax.set_ylabel("score (%)")
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return _save(plt, fig, path)


def logit_lens_png(path: Path, lens: dict[str, dict]) -> Path:
  """KL(p_layer || p_final) and top-1 agreement per layer, one line per checkpoint."""
  plt, (fig, _) = _figure(10, 4)
  fig.clf()
  ax_kl, ax_ag = fig.subplots(1, 2)
  for label, r in lens.items():
    layers = np.arange(len(r["kl"]))
    ax_kl.plot(layers, r["kl"], "o-", label=label)
    ax_ag.plot(layers, r["agreement"], "o-", label=label)
  ax_kl.set_ylabel("KL(early exit || final) (nats)")
  ax_ag.set_ylabel("top-1 agreement with the final layer")
  for ax in (ax_kl, ax_ag):
    ax.set_xlabel("layer (0 = embedding)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("LogitLens on validation text")
  return _save(plt, fig, path)


def cka_png(path: Path, cka: np.ndarray, name_x: str, name_y: str) -> Path:
  """Heatmap of linear CKA between every layer of model x (rows) and model y (columns)."""
  plt, (fig, ax) = _figure(1.2 + 0.6 * cka.shape[1] + 2, 1.2 + 0.6 * cka.shape[0] + 1)
  im = ax.imshow(cka, vmin=0, vmax=1, cmap="viridis", origin="lower")
  for i in range(cka.shape[0]):
    for j in range(cka.shape[1]):
      ax.text(j, i, f"{cka[i, j]:.2f}", ha="center", va="center", color="w" if cka[i, j] < 0.6 else "k",
              fontsize=7)
  best = np.argmax(cka, axis=1)
  ax.plot(best, np.arange(cka.shape[0]), "r+", markersize=12, label="best match per row")
  ax.set_xlabel(f"{name_y} layer (0 = embedding)")
  ax.set_ylabel(f"{name_x} layer (0 = embedding)")
  ax.legend(fontsize=7, loc="upper left")
  fig.colorbar(im, ax=ax, label="linear CKA")
  return _save(plt, fig, path)


def gates_png(path: Path, pieces: Sequence[str], gates: dict[int, np.ndarray], title: str) -> Path:
  """Heatmap of per-token gates: one row per (Engram layer, branch), one column per token, the tokens below."""
  rows, labels = [], []
  for layer, g in sorted(gates.items()):  # g [S, G]
    for b in range(g.shape[1]):
      rows.append(g[:, b])
      labels.append(f"layer {layer}" + (f" branch {b}" if g.shape[1] > 1 else ""))
  grid = np.stack(rows)  # [rows, S]
  plt, (fig, ax) = _figure(max(6, 0.28 * len(pieces) + 2), 1.2 + 0.45 * len(rows) + 1.2)
  im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
  ax.set_yticks(np.arange(len(rows)), labels, fontsize=8)
  ax.set_xticks(np.arange(len(pieces)), pieces, rotation=90, fontsize=7)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="gate", fraction=0.03)
  return _save(plt, fig, path)


def gates_html(path: Path, pieces: Sequence[str], gates: dict[int, np.ndarray], title: str) -> Path:
  """The text once per (Engram layer, branch), each token's background shaded by its gate (hover: value)."""
  parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:70em} .t{padding:1px 0;border-radius:2px}"
           " p{line-height:1.9}</style>", f"<h2>{html.escape(title)}</h2>",
           "<p>Background: the Engram gate at each token (white 0 .. orange 1), for the n-gram ending at it.</p>"]
  for layer, g in sorted(gates.items()):
    for b in range(g.shape[1]):
      spans = "".join(f"<span class='t' title='{v:.3f}' style='background:rgba(255,120,0,{v:.3f})'>"
                      f"{html.escape(p)}</span>" for p, v in zip(pieces, g[:, b]))
      parts.append(f"<h3>layer {layer}, branch {b} (mean {g[:, b].mean():.3f})</h3><p>{spans}</p>")
  return atomic_write(path, "\n".join(parts) + "\n")
