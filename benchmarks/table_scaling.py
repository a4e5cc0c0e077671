"""Does the Engram layer's train step grow with the table? Dense vs row-sparse table optimizers, one run.

  python benchmarks/table_scaling.py [--rows 2400000 9600000 38400000] [--reps 7] [--out PATH]

One Engram layer as in the issue that asked for this (B=8, S=512, 16 hash heads x 32 dims, D=256, G=4 branches;
ids precomputed, uniform over the table): forward + backward + update time, variants interleaved within each table
size (one table shared by the variants, each keeping its own optimizer state, so the largest size fits in memory):
  adam_dense       gradient w.r.t. the table [V, d] (the gather's scatter-add), optax Adam over table, m, v;
  adam_lazy        gradient w.r.t. the gathered rows, summed per unique row, LazyAdam on the touched rows;
  adagrad_rowwise  the same row gradients, row-wise Adagrad (one accumulator per row);
  sgd              the same row gradients, SGD on the touched rows;
  no_table_update  the floor: forward + backward w.r.t. the rows and the dense weights' update, the table untouched;
  host_adam_lazy   host-resident: the table and its LazyAdam moments are numpy arrays; per step the host gathers the
                   rows, the device runs forward + backward w.r.t. them and sums the row gradients, and the host
                   applies LazyAdam to the touched rows in place (engram_jax.host_optim). Serial here: training
                   overlaps most of the host's update with the next step, so this is an upper bound on its cost.
The dense weights always take AdamW. Before a variant's state is allocated the host's available memory is checked;
a variant that would not fit is recorded as "not run: needs N GB". Reports per variant and size: median time, the
median over rounds of its ratio to adam_dense and to the floor within a round, its time over the floor, its scaling
from the smallest size (ratio of medians, and ratio of floor-normalised medians: robust to load drifting between
sizes), optimizer-state bytes per table row (measured from the state arrays) and the load average.
Prints a table and writes JSON (default benchmarks/results/table_scaling.json). CPU: ratios only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engram_jax import host_optim, sparse_tables  # noqa: E402
from engram_jax.layers.engram import engram_update  # noqa: E402

B, S, H, DH, D, G = 8, 512, 16, 32, 256, 4
E = H * DH
VARIANTS = ("adam_dense", "adam_lazy", "adagrad_rowwise", "sgd", "no_table_update", "host_adam_lazy")
SPARSE = ("adam_lazy", "adagrad_rowwise", "sgd")
HOST = "host_adam_lazy"
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


_W_TX = optax.adamw(LR, **HP, weight_decay=0.1)  # the dense weights' optimizer in every variant


def _rows_step(w, ow, rows, batch):
  """Forward + backward w.r.t. the gathered rows [B, S, H, d] and the dense weights' AdamW update:
  (loss, row gradient [B, S, H, d], new weights, new AdamW state)."""
  _, h, seg, target = batch
  val, (gw, gr) = jax.value_and_grad(_loss, argnums=(0, 1))(w, rows, h, seg, target)
  uw, ow = _W_TX.update(gw, ow, w)
  return val, gr, optax.apply_updates(w, uw), ow


def make_steps(num_rows: int):
  """Jitted step per variant: (table, state, batch) -> (table, state, loss); table and state donated."""
  t_tx = optax.adam(5 * LR, **HP)

  def dense(table, state, batch):
    ids, h, seg, target = batch
    def loss(w, table):
      return _loss(w, jnp.take(table, ids, axis=0), h, seg, target)
    val, (gw, gt) = jax.value_and_grad(loss, argnums=(0, 1))(state["w"], table)
    uw, ow = _W_TX.update(gw, state["ow"], state["w"])
    ut, ot = t_tx.update(gt, state["ot"], table)
    return optax.apply_updates(table, ut), {"w": optax.apply_updates(state["w"], uw), "ow": ow, "ot": ot}, val

  def rows_grads(table, state, batch):
    rows = jnp.take(table, batch[0], axis=0)  # [B, S, H, d], forward only
    return _rows_step(state["w"], state["ow"], rows, batch)

  def sparse(kind):
    def step(table, state, batch):
      ids, _, seg, _ = batch
      val, gr, w, ow = rows_grads(table, state, batch)
      rg = sparse_tables.row_grads(ids, gr, seg > 0, num_rows)
      table, st = sparse_tables.apply_rows(kind, table, state["ot"], rg, jnp.float32(5 * LR), **HP)
      return table, {"w": w, "ow": ow, "ot": st}, val
    return step

  def floor(table, state, batch):
    val, gr, w, ow = rows_grads(table, state, batch)
    return table, {**state, "w": w, "ow": ow}, val + 0 * jnp.sum(gr)  # the row gradient stays live

  fns = {"adam_dense": dense, "no_table_update": floor, **{k: sparse(k) for k in SPARSE}}
  return {k: jax.jit(f, donate_argnums=(0, 1)) for k, f in fns.items()}


def make_host_step(num_rows: int):
  """host_adam_lazy: (state with the numpy table, batch, ids as numpy) -> loss; the table and moments change in
  place."""
  @jax.jit
  def device(w, ow, rows, batch):  # rows [B, S, H, d] gathered on the host
    val, gr, w, ow = _rows_step(w, ow, rows, batch)
    rg = sparse_tables.row_grads(batch[0], gr, batch[2] > 0, num_rows)
    return val, rg.ids[0], rg.grads[0], w, ow  # [U], [U, d] (fill id num_rows)

  def step(state, batch, ids_np):
    rows = np.take(state["table"], ids_np, axis=0)  # [B, S, H, d]
    val, uids, sums, state["w"], state["ow"] = device(state["w"], state["ow"], rows, batch)
    uids, sums = np.asarray(uids), np.asarray(sums)
    touched = uids < num_rows
    t = int(state["ot"]["count"]) + 1
    scalars = host_optim.StepScalars(np.float32(-5 * LR), np.float32(1 - HP["b1"] ** t),
                                     np.float32(1 - HP["b2"] ** t))
    host_optim.apply("adam_lazy", state["table"], state["ot"], uids[touched], sums[touched], scalars, **HP)
    host_optim.finish_step(state["ot"])
    return val

  return step


def init_state(variant: str, table: jax.Array, w: dict) -> dict:
  """The variant's own state (the table itself is shared)."""
  ow = optax.adamw(LR, **HP, weight_decay=0.1).init(w)
  if variant == HOST:  # its own table in host memory, with the shared table's values
    table_np = np.array(table)
    return {"w": w, "ow": ow, "table": table_np, "ot": host_optim.init_state("adam_lazy", table_np)}
  if variant == "adam_dense":
    return {"w": w, "ow": ow, "ot": jax.jit(optax.adam(5 * LR, **HP).init)(table)}
  if variant == "no_table_update":
    return {"w": w, "ow": ow}
  return {"w": w, "ow": ow, "ot": jax.jit(lambda t: sparse_tables.init_state(variant, t))(table)}


def table_state_bytes(state: dict, num_rows: int) -> int:
  if "ot" not in state:
    return 0
  if "table" in state:  # host-resident: numpy state
    return sum(x.nbytes for x in state["ot"].values() if x.ndim and x.shape[0] == num_rows)
  return sum(x.nbytes for x in jax.tree.leaves(state["ot"]) if x.ndim and x.shape[0] == num_rows)


def needed_bytes(variant: str, num_rows: int) -> int:
  """Host memory a variant adds beside the shared table: its state, plus for adam_dense the dense gradient and
  Adam's update temporaries (~2 table-sized arrays)."""
  table = num_rows * DH * 4
  kind = "adam_lazy" if variant == HOST else variant
  state = num_rows * sparse_tables.state_bytes_per_row(kind, DH) if variant != "no_table_update" else 0
  extra = 2 * table if variant == "adam_dense" else table if variant == HOST else 0  # HOST: its own table
  return state + extra + (1 << 30)  # + 1 GiB of activations / slack


def available_bytes() -> int:
  for line in Path("/proc/meminfo").read_text().splitlines():
    if line.startswith("MemAvailable:"):
      return int(line.split()[1]) * 1024
  return 1 << 60


def _median_ratio(a, b) -> float:
  return float(np.median(np.asarray(a) / np.asarray(b)))


def run_size(num_rows: int, reps: int, rng) -> dict:
  load_before = os.getloadavg()
  ids = jnp.asarray(rng.integers(0, num_rows, (B, S, H)), jnp.int32)
  h = jnp.asarray(rng.normal(size=(B, S, G, D)), jnp.float32)
  seg = jnp.ones((B, S), jnp.int32)
  target = jnp.asarray(rng.normal(size=(B, S, G, D)), jnp.float32)
  batch = (ids, h, seg, target)
  fns = make_steps(num_rows)
  host_step, ids_np = make_host_step(num_rows), np.asarray(ids)
  # one table for all variants (each step donates it and hands it on); its values do not change the timing
  table = jax.jit(lambda: jnp.full((num_rows, DH), 1e-2, jnp.float32))()  # no table-sized temporaries
  states, not_run = {}, {}
  for v in VARIANTS:
    need, have = needed_bytes(v, num_rows), available_bytes()
    if need > have:
      not_run[v] = f"not run: needs {need / 2**30:.1f} GB, {have / 2**30:.1f} GB available"
      print(f"rows {num_rows}: {v} {not_run[v]}", flush=True)
      continue
    states[v] = init_state(v, table, _weights(np.random.default_rng(1)))
  run = [v for v in VARIANTS if v in states]
  state_bytes = {v: table_state_bytes(states[v], num_rows) / num_rows for v in run}

  def one_step(v):
    nonlocal table
    if v == HOST:
      return jax.block_until_ready(host_step(states[v], batch, ids_np))
    table, states[v], loss = fns[v](table, states[v], batch)
    return jax.block_until_ready((table, loss))

  for v in run:  # compile + warm (a few steps: the optimizer state's pages get touched)
    for _ in range(3):
      one_step(v)
  times = {v: [] for v in run}
  for _ in range(reps):  # interleaved: every variant once per round
    for v in run:
      t0 = time.perf_counter()
      one_step(v)
      times[v].append(time.perf_counter() - t0)
  states.clear()  # free the optimizer states and the table before the next size
  table = None
  t = {v: np.asarray(x) for v, x in times.items()}
  floor = t["no_table_update"]
  out = {"rows": num_rows, "ms": {v: 1e3 * float(np.median(x)) for v, x in t.items()},
         # paired within a round (robust to load drifting between rounds on a shared machine):
         "x_floor_paired": {v: _median_ratio(t[v], floor) for v in run},
         "over_floor_ms": {v: 1e3 * float(np.median(t[v] - floor)) for v in run},
         "times_s": {v: x.tolist() for v, x in t.items()}, "not_run": not_run,
         "state_bytes_per_row": state_bytes, "rows_touched_per_step": int(np.unique(np.asarray(ids)).size),
         "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())}}
  if "adam_dense" in t:
    out["x_dense_paired"] = {v: _median_ratio(t[v], t["adam_dense"]) for v in run}
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, nargs="+", default=[2_400_000, 9_600_000, 38_400_000])
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "table_scaling.json"))
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  results = []
  for v in sorted(args.rows):
    results.append(run_size(v, args.reps, rng))
    print(f"rows {v}: done, load average {results[-1]['load_average_1_5_15']['after']}", flush=True)
  base = results[0]
  scaling, scaling_floor = {}, {}
  for v in VARIANTS:
    if v in results[-1]["ms"] and v in base["ms"]:
      scaling[v] = results[-1]["ms"][v] / base["ms"][v]
      scaling_floor[v] = results[-1]["x_floor_paired"][v] / base["x_floor_paired"][v]
  print(f"{'rows':>10} {'variant':>16} {'ms':>9} {'x dense':>8} {'x floor':>8} {'x own@' + str(base['rows']):>14} "
        f"{'ms over floor':>13} {'state B/row':>11}")
  for r in results:
    for v in VARIANTS:
      if v not in r["ms"]:
        print(f"{r['rows']:>10} {v:>16} {r['not_run'][v]}")
        continue
      ms = r["ms"][v]
      dense = r.get("x_dense_paired", {}).get(v, float("nan"))
      print(f"{r['rows']:>10} {v:>16} {ms:9.1f} {dense:8.2f} {r['x_floor_paired'][v]:8.2f} "
            f"{ms / base['ms'][v] if v in base['ms'] else float('nan'):14.2f} {r['over_floor_ms'][v]:13.1f} "
            f"{r['state_bytes_per_row'][v]:11.0f}")
  print("x dense / x floor: median over rounds of the ratio within a round; ms over floor: median of (variant - "
        "no_table_update) within a round")
  out = {"layer": dict(batch=B, seq=S, heads=H, head_dim=DH, d_model=D, branches=G), "reps": args.reps,
         "results": results, "machine": dict(cpus=os.cpu_count(), platform=platform.platform(),
                                             backend=jax.default_backend(), jax=jax.__version__),
         "scaling_largest_over_smallest": scaling, "scaling_floor_normalised": scaling_floor,
         "rows_ratio": results[-1]["rows"] / base["rows"]}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1))
  print(f"rows x{out['rows_ratio']:.0f}: time ratio " + ", ".join(f"{v} {x:.2f}" for v, x in scaling.items()))
  print("floor-normalised: " + ", ".join(f"{v} {x:.2f}" for v, x in scaling_floor.items()))
  print("wrote", args.out)
  return out


if __name__ == "__main__":
  main()
