"""Does the Engram layer's train step grow with the table? Dense vs row-sparse table optimizers, one run.

  nice -n 10 python benchmarks/table_scaling.py [--rows 600000 2400000 9600000] [--reps 7] [--out PATH]

One Engram layer as in the issue that asked for this (B=8, S=512, 16 hash heads x 32 dims, D=256, G=4 branches;
ids precomputed, uniform over the table): forward + backward + update time, medians of variants interleaved
within each table size:
  adam_dense       gradient w.r.t. the table [V, d] (the gather's scatter-add), optax Adam over table, m, v;
  adam_lazy        gradient w.r.t. the gathered rows, summed per unique row, LazyAdam on the touched rows;
  adagrad_rowwise  the same row gradients, row-wise Adagrad (one accumulator per row);
  no_table_update  the floor: forward + backward w.r.t. the rows and the dense weights' update, the table untouched.
The dense weights always take AdamW. Reports each variant's time, its ratio to adam_dense at the same V and to
itself at the smallest V, and optimizer-state bytes per table row (measured from the state arrays).
Prints a table and writes JSON (default benchmarks/results/table_scaling.json). CPU: ratios only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engram_jax import sparse_tables  # noqa: E402
from engram_jax.layers.engram import engram_update  # noqa: E402

B, S, H, DH, D, G = 8, 512, 16, 32, 256, 4
E = H * DH
VARIANTS = ("adam_dense", "adam_lazy", "adagrad_rowwise", "no_table_update")
HP = dict(b1=0.9, b2=0.95, eps=1e-8)
LR = 1e-3


def _weights(rng) -> dict:
  n = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2] if len(s) > 1 else 1), jnp.float32)
  return {"value_proj": n(E, D), "key_proj": n(G, E, D), "gate_norm_h": jnp.ones((G, D)),
          "gate_norm_k": jnp.ones((G, D)), "conv_norm": jnp.ones((G, D)), "conv_weight": 0.1 * n(4, G, D)}


def _loss(w, rows, h, seg, target):
  """rows [B, S, H, d] -> scalar: <Y, target> / tokens for the layer's output Y [B, S, G, D]."""
  y, _, _ = engram_update(w, h, rows.reshape(B, S, E), dilation=3, gate_eps=1e-6, conv_eps=1e-6, segment_ids=seg)
  return jnp.sum(y * target) / (B * S)


def make_steps(num_rows: int):
  """Jitted step per variant: (state, batch) -> (state, loss); state donated."""
  w_tx = optax.adamw(LR, **HP, weight_decay=0.1)
  t_tx = optax.adam(5 * LR, **HP)

  def dense(state, batch):
    ids, h, seg, target = batch
    def loss(w, table):
      return _loss(w, jnp.take(table, ids, axis=0), h, seg, target)
    val, (gw, gt) = jax.value_and_grad(loss, argnums=(0, 1))(state["w"], state["table"])
    uw, ow = w_tx.update(gw, state["ow"], state["w"])
    ut, ot = t_tx.update(gt, state["ot"], state["table"])
    return {"w": optax.apply_updates(state["w"], uw), "ow": ow, "table": optax.apply_updates(state["table"], ut),
            "ot": ot}, val

  def rows_grads(state, batch):
    ids, h, seg, target = batch
    rows = jnp.take(state["table"], ids, axis=0)  # [B, S, H, d], forward only
    val, (gw, gr) = jax.value_and_grad(_loss, argnums=(0, 1))(state["w"], rows, h, seg, target)
    uw, ow = w_tx.update(gw, state["ow"], state["w"])
    return val, gr, optax.apply_updates(state["w"], uw), ow

  def sparse(kind):
    def step(state, batch):
      ids, _, seg, _ = batch
      val, gr, w, ow = rows_grads(state, batch)
      rg = sparse_tables.row_grads(ids, gr, seg > 0, num_rows)
      table, st = sparse_tables.apply_rows(kind, state["table"], state["ot"], rg, jnp.float32(5 * LR), **HP)
      return {"w": w, "ow": ow, "table": table, "ot": st}, val
    return step

  def floor(state, batch):
    val, gr, w, ow = rows_grads(state, batch)
    return {**state, "w": w, "ow": ow}, val + 0 * jnp.sum(gr)  # the row gradient stays live

  fns = {"adam_dense": dense, "adam_lazy": sparse("adam_lazy"), "adagrad_rowwise": sparse("adagrad_rowwise"),
         "no_table_update": floor}
  return {k: jax.jit(f, donate_argnums=0) for k, f in fns.items()}


def init_state(variant: str, table: jax.Array, w: dict) -> dict:
  ow = optax.adamw(LR, **HP, weight_decay=0.1).init(w)
  if variant == "adam_dense":
    return {"w": w, "ow": ow, "table": table, "ot": optax.adam(5 * LR, **HP).init(table)}
  if variant == "no_table_update":
    return {"w": w, "ow": ow, "table": table}
  return {"w": w, "ow": ow, "table": table, "ot": sparse_tables.init_state(variant, table)}


def table_state_bytes(variant: str, state: dict) -> int:
  if "ot" not in state:
    return 0
  return sum(x.nbytes for x in jax.tree.leaves(state["ot"]) if x.ndim and x.shape[0] == state["table"].shape[0])


def run_size(num_rows: int, reps: int, rng) -> dict:
  ids = jnp.asarray(rng.integers(0, num_rows, (B, S, H)), jnp.int32)
  h = jnp.asarray(rng.normal(size=(B, S, G, D)), jnp.float32)
  seg = jnp.ones((B, S), jnp.int32)
  target = jnp.asarray(rng.normal(size=(B, S, G, D)), jnp.float32)
  batch = (ids, h, seg, target)
  fns = make_steps(num_rows)
  states = {}
  for v in VARIANTS:  # one table each (each is donated and updated in place)
    table = jax.random.normal(jax.random.key(0), (num_rows, DH), jnp.float32)
    states[v] = init_state(v, table, _weights(np.random.default_rng(1)))
  state_bytes = {v: table_state_bytes(v, states[v]) / num_rows for v in VARIANTS}
  for v in VARIANTS:  # compile + warm (a few steps: the optimizer state's pages get touched)
    for _ in range(3):
      states[v], loss = fns[v](states[v], batch)
    jax.block_until_ready(loss)
  times = {v: [] for v in VARIANTS}
  for _ in range(reps):  # interleaved: every variant once per round
    for v in VARIANTS:
      t0 = time.perf_counter()
      states[v], loss = fns[v](states[v], batch)
      jax.block_until_ready((states[v]["table"], loss))
      times[v].append(time.perf_counter() - t0)
  del states
  t = {v: np.asarray(x) for v, x in times.items()}
  return {"rows": num_rows, "ms": {v: 1e3 * float(np.median(x)) for v, x in t.items()},
          # paired within a round (robust to load drifting between rounds on a shared machine):
          "x_dense_paired": {v: float(np.median(t[v] / t["adam_dense"])) for v in VARIANTS},
          "over_floor_ms": {v: 1e3 * float(np.median(t[v] - t["no_table_update"])) for v in VARIANTS},
          "times_s": {v: x.tolist() for v, x in t.items()},
          "state_bytes_per_row": state_bytes, "rows_touched_per_step": int(np.unique(np.asarray(ids)).size)}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, nargs="+", default=[600_000, 2_400_000, 9_600_000])
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "table_scaling.json"))
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  results = [run_size(v, args.reps, rng) for v in sorted(args.rows)]
  base = results[0]
  print(f"{'rows':>10} {'variant':>16} {'ms':>9} {'x dense':>8} {'x own@' + str(base['rows']):>14} "
        f"{'ms over floor':>13} {'state B/row':>11}")
  for r in results:
    for v in VARIANTS:
      ms = r["ms"][v]
      print(f"{r['rows']:>10} {v:>16} {ms:9.1f} {r['x_dense_paired'][v]:8.2f} "
            f"{ms / base['ms'][v]:14.2f} {r['over_floor_ms'][v]:13.1f} {r['state_bytes_per_row'][v]:11.0f}")
  print("x dense: median over rounds of the ratio within a round; ms over floor: median of (variant - "
        "no_table_update) within a round")
  out = {"layer": dict(batch=B, seq=S, heads=H, head_dim=DH, d_model=D, branches=G), "reps": args.reps,
         "results": results, "machine": dict(cpus=jax.local_device_count(), platform=platform.platform(),
                                             backend=jax.default_backend(), jax=jax.__version__),
         "scaling_largest_over_smallest": {v: results[-1]["ms"][v] / base["ms"][v] for v in VARIANTS},
         "rows_ratio": results[-1]["rows"] / base["rows"]}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1))
  print(f"rows x{out['rows_ratio']:.0f}: time ratio " +
        ", ".join(f"{v} {x:.2f}" for v, x in out["scaling_largest_over_smallest"].items()))
  print("wrote", args.out)
  return out


if __name__ == "__main__":
  main()
