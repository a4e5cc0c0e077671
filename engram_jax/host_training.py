"""Training with Engram tables in host memory (EngramConfig.table_placement='host').

The tables and their optimizer state are numpy arrays in host memory; the device never holds a table. Per step:
  host worker   hashes batch t+1 (the shared host hashing, bit-identical to the in-graph one) and gathers its rows
                while the device runs step t;
  device        the jitted train step reads the gathered rows [B, S, H, d] instead of a table parameter (the params
                hold a [V, 0] stand-in per table) and returns each table's clipped row gradients (unique ids of
                fixed size U = B * S * H with fill id V, summed gradients: sparse_tables.row_grads) and the step's
                scalars;
  host          applies the sparse update (engram_jax.host_optim) in two parts, both exact because rows update
                independently: first the rows batch t+1 reads (then it re-gathers just those positions of batch
                t+1 and sends the rows), then, on the worker while the device runs step t+1, all the others.
The device step is the row-sparse train step of engram_jax.steps, so losses, backbone updates and table rows equal
device-resident training with the same table optimizer ('sgd', 'adam_lazy', 'adagrad_rowwise') up to float
rounding, not bit for bit: the row gradients, the step's scalars (learning rate, bias corrections) and adagrad's
row mean square come from the device, but XLA:CPU fuses a * b + c into one multiply-add and divides by a broadcast
scalar through its reciprocal while numpy rounds each operation (measured: ~1 ulp per update; over 10 steps the
losses agreed to 1e-6 and the rows to ~1e-6). 'sgd' is compared with the device's dense optax.sgd, whose clipping
norm also sums the dense [V, d] gradient in another order. Host training itself is deterministic: stop-and-resume
is bit-exact.

A checkpoint holds the same tree as device-resident row-sparse training (tables under params, their state under
opt['tables']); host arrays are saved from copies placed on the CPU device, so orbax writes them atomically with the
rest, in the same step directory and integrity manifest, and load_model / eval / decode read the run unchanged.

Single device and single process only (a mesh with more devices is refused before compilation).
Letters: B batch, S sequence, H hash heads, d row width, V table rows, U = B * S * H row slots, M = B * S * H.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax import guard, host_optim, optim, sharding, sparse_tables, steps
from engram_jax.host_table import HostHasher
from engram_jax.models.config import ModelConfig

HOST_KEY = "host_tables"  # metrics entry of the device step: per table, what the host update needs
State = dict[str, Any]


def uses_host_tables(model_config: ModelConfig) -> bool:
  return bool(model_config.engram_layers) and model_config.engram is not None and (
      model_config.engram.table_placement == "host")


def check_config(model_config: ModelConfig, optimizer: optim.OptimizerConfig, mesh, inloop_tasks=()) -> None:
  """Raises ValueError naming the field and the fix when host-table training cannot run (before compilation)."""
  if optimizer.table_optimizer == "adam_dense":
    raise ValueError("OptimizerConfig.table_optimizer='adam_dense' with EngramConfig.table_placement='host': dense "
                     "Adam reads and writes every table row each step, which host tables exist to avoid. Fix: "
                     "table_optimizer='adam_lazy' (or 'adagrad_rowwise' / 'sgd'), or table_placement='device'")
  host_optim.check_kind(optimizer.table_optimizer)
  if mesh.size != 1 or jax.process_count() != 1:
    raise ValueError(f"EngramConfig.table_placement='host' trains on one device in one process; RunConfig.mesh "
                     f"has {mesh.size} devices ({jax.process_count()} processes). Fix: RunConfig.mesh='data=1', or "
                     "table_placement='device' for a mesh")
  if inloop_tasks:
    raise ValueError("RunConfig.inloop_tasks needs the tables on the device; with EngramConfig.table_placement="
                     "'host' set inloop_tasks=() and evaluate the checkpoints (python -m evals.run)")


def mesh_devices(spec: str) -> list | None:
  """[the first device] when RunConfig.mesh asks for one device (every axis size 1, e.g. 'data=1'), else None."""
  sizes = [part.split("=")[-1].strip() for part in str(spec).split(",") if part.strip()]
  return jax.devices()[:1] if sizes and all(s == "1" for s in sizes) else None


def shift_right_np(targets: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """losses.shift_right on the host: decoder inputs [B, S]."""
  prev = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  prev_seg = np.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
  return np.where(prev_seg == segment_ids, prev, 0).astype(np.int32)


@dataclasses.dataclass
class HostTimes:
  """Host work of the steps so far (seconds). main_*: on the step's critical path; worker_*: overlapped with the
  device step (hidden unless the main thread waits for the worker: main_wait_worker_s)."""

  worker_hash_s: float = 0.0
  worker_gather_s: float = 0.0
  worker_update_s: float = 0.0  # the rows the next batch does not read
  main_wait_device_s: float = 0.0  # fetching the row gradients (the device step's run time, mostly)
  main_wait_worker_s: float = 0.0
  main_update_s: float = 0.0  # the rows the next batch reads
  main_patch_s: float = 0.0  # re-gathering those rows of the next batch
  main_send_s: float = 0.0  # device_put of the next batch's ids and rows
  rows_updated: int = 0
  rows_updated_main: int = 0
  steps: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class HostBatch:
  """A train batch (numpy [B, S] arrays) with its host-side preparation (hash ids, gathered rows)."""

  batch: dict
  prepared: concurrent.futures.Future  # -> (ids {block: [B, S, H]}, rows {block: [B, S, H, d]})
  device: dict | None = None  # {'engram_ids', 'engram_rows'} already sent (patched by the previous step)


class HostFeed:
  """Wraps the train iterator: yields HostBatch one batch ahead (its hashing and gathering queued on the worker).
  `state()` is the position after the batches yielded so far (not the one pulled ahead)."""

  def __init__(self, setup: HostSetup, it):
    self.setup, self.it = setup, it
    self.ahead: HostBatch | None = None
    self._position = None

  def _pull(self) -> HostBatch | None:
    try:
      batch = next(self.it)
    except StopIteration:
      return None
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    return HostBatch(batch, self.setup.worker.submit(self.setup.prepare, batch))

  def __iter__(self):
    return self

  def __next__(self) -> HostBatch:
    current = self.ahead if self.ahead is not None else self._pull()
    if current is None:
      raise StopIteration
    self._position = dict(self.it.state()) if hasattr(self.it, "state") else {}
    self.ahead = self._pull()
    return current

  def state(self) -> dict:
    if self._position is not None:
      return dict(self._position)
    return dict(self.it.state()) if hasattr(self.it, "state") else {}


@functools.lru_cache(maxsize=4)
def _compiled(model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh,
              frozen_map: steps.FrozenMap | None, on_nonfinite: str):
  """The jitted pieces (cached per configuration, like steps.make_setup): see HostSetup."""
  compression = None if frozen_map is None else frozen_map.array
  abstract_model = nnx.eval_shape(lambda: steps.build_model(model_config, mesh, 0, compression))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  labels = optim.param_labels(params)
  kind = optimizer.table_optimizer
  plan = sparse_tables.Plan.of(abstract_model, kind, optimizer.b1, optimizer.b2, optimizer.eps, None)
  paths = list(plan.paths)
  params = nnx.to_pure_dict(params)
  shapes = [sparse_tables.get_path(params, p).shape for p in paths]  # [V, d] per table
  tx = optim.backbone_optimizer(optimizer, total_steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_sh = nnx.to_pure_dict(sharding.state_shardings(nnx.split(abstract_model, nnx.Param, ...)[1], mesh))
  dev_sh = {"params": param_sh,
            "opt": {"backbone": optim.opt_state_shardings(tx, sparse_tables.without(params, paths),
                                                          sparse_tables.without(param_sh, paths), replicated)},
            "rest": nnx.to_pure_dict(sharding.state_shardings(rest, mesh)), "step": replicated, "rng": replicated}

  def standins():
    return [jnp.zeros((v, 0), jnp.float32) for v, _ in shapes]  # [V, 0]: the row count, no bytes

  def init_device(seed):  # the table's initialisation is dead code here (XLA drops it)
    model = steps.build_model(model_config, mesh, seed, compression)
    _, p, r = nnx.split(model, nnx.Param, ...)
    p = nnx.to_pure_dict(p)
    return {"params": sparse_tables.with_leaves(p, paths, standins()),
            "opt": {"backbone": tx.init(sparse_tables.without(p, paths))}, "rest": nnx.to_pure_dict(r),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed)}

  def init_tables(seed):  # on the host's CPU device, without a mesh (the same values: rows do not depend on it)
    _, p, _ = nnx.split(steps.build_model(model_config, None, seed, compression), nnx.Param, ...)
    return [sparse_tables.get_path(nnx.to_pure_dict(p), path) for path in paths]

  def host_outputs(row_grads, batch, lr_fn):
    out = {}
    for i, g in zip(plan.blocks, row_grads):
      count = batch["engram_counts"][i]  # updates applied to this table so far
      grads = g.grads[0]  # [U, d]
      o = {"ids": g.ids[0], "grads": grads, "step_size": -lr_fn(count).astype(grads.dtype)}
      if kind == "adam_lazy":  # the expressions of sparse_tables.lazy_adam_rows
        t = (count + 1).astype(grads.dtype)
        o["bc1"], o["bc2"] = 1 - optimizer.b1 ** t, 1 - optimizer.b2 ** t
      elif kind == "adagrad_rowwise":  # of sparse_tables.adagrad_rowwise_rows
        o["mean_sq"] = jnp.mean(jnp.square(grads), axis=-1)  # [U]
      out[str(i)] = o
    return {HOST_KEY: out}

  from engram_jax.steps import _balance_update_fn
  schedule = optim.learning_rate_schedule(optimizer, total_steps)
  train_step = guard.guarded(steps.make_train_step(graphdef, tx, _balance_update_fn(model_config), schedule, plan,
                                                   optimizer, total_steps, host_tables=host_outputs), on_nonfinite)
  cpu = jax.local_devices(backend="cpu")[0]
  return dict(graphdef=graphdef, labels=labels, plan=plan, paths=paths, shapes=shapes, tx=tx, dev_shardings=dev_sh,
              init_device=jax.jit(init_device, out_shardings=dev_sh), cpu=cpu,
              init_tables=jax.jit(init_tables),  # called under jax.default_device(cpu)
              train_step=jax.jit(train_step, donate_argnums=0, out_shardings=(dev_sh, None)),
              eval_step=jax.jit(steps.make_eval_step(graphdef)),
              hashers={i: HostHasher(np.asarray(compression if compression is not None else np.arange(
                  model_config.vocab_size), np.int32), abstract_model.blocks[i].engram.spec) for i in plan.blocks})


class HostSetup:
  """Setup-like (steps.Setup) pieces for host tables. The train state is the device-resident row-sparse layout
  with numpy arrays at the table leaves (params and opt['tables']): `init`, `train_step(state, HostBatch)`,
  `eval_step`, `abstract` (the restore target: table leaves on the CPU device), `adopt(restored)`,
  `checkpoint_state(state)`, `feed(train_iter)`, `close()`."""

  def __init__(self, model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh,
               compression: np.ndarray | None = None, on_nonfinite: str = "stop"):
    check_config(model_config, optimizer, mesh)
    self.c = _compiled(model_config, optimizer, total_steps, mesh, steps.FrozenMap.of(compression), on_nonfinite)
    self.kind, self.optimizer, self.mesh = optimizer.table_optimizer, optimizer, mesh
    self.graphdef, self.labels = self.c["graphdef"], self.c["labels"]
    self.paths, self.blocks = self.c["paths"], tuple(self.c["plan"].blocks)
    self.num_rows = {i: s[0] for i, s in zip(self.blocks, self.c["shapes"])}
    self.hashers = self.c["hashers"]
    self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-host-tables")
    self._last = None  # the worker's latest job (the tables are consistent once it is done)
    self._marks = {i: np.zeros(v, bool) for i, v in self.num_rows.items()}  # [V] scratch, all False between uses
    self.times = HostTimes()
    self.tables: dict[int, np.ndarray] = {}
    self.states: dict[int, dict] = {}
    self._standins = None
    self.feed_: HostFeed | None = None
    cpu_sh = jax.sharding.SingleDeviceSharding(self.c["cpu"])
    dev_abstract = jax.eval_shape(self.c["init_device"], jnp.int32(0))
    dev_abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), dev_abstract,
                                self.c["dev_shardings"])
    on_cpu = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=cpu_sh)
    tables = [on_cpu(s, jnp.float32) for s in self.c["shapes"]]
    states = [jax.tree.map(lambda a: on_cpu(a.shape, a.dtype), host_optim.init_state(
        self.kind, np.empty((s[0], 0), np.float32))) for s in self.c["shapes"]]
    for st, s in zip(states, self.c["shapes"]):  # init_state above had d = 0: the real row width
      if "moments" in st:
        st["moments"] = on_cpu((s[0], 2) + tuple(s[1:]), jnp.float32)
    self.abstract = self._full(dev_abstract, tables, states)

  # -------------------------------------------------------------------------------------------- state layout

  def _full(self, dev: State, tables: list, states: list) -> State:
    """Device state + host leaves -> the row-sparse train state tree."""
    return {**dev, "params": sparse_tables.with_leaves(dev["params"], self.paths, tables),
            "opt": {"backbone": dev["opt"]["backbone"],
                    "tables": sparse_tables.with_leaves({}, self.paths, states)}}

  def _device_state(self, state: State) -> State:
    standins = self._standins or self._new_standins()
    return {**state, "params": sparse_tables.with_leaves(state["params"], self.paths, standins),
            "opt": {"backbone": state["opt"]["backbone"]}}

  def _new_standins(self) -> list:
    """[V, 0] arrays placed as the train step returns them (so its second call does not compile again)."""
    shardings = [sparse_tables.get_path(self.c["dev_shardings"]["params"], p) for p in self.paths]
    return [jax.device_put(jnp.zeros((self.num_rows[i], 0), jnp.float32), sh) for i, sh in zip(self.blocks, shardings)]

  def device_state(self, state: State) -> State:
    """The part of the state on the device (tables replaced by [V, 0] stand-ins)."""
    return self._device_state(state)

  def _own(self, state: State) -> State:
    """Takes the host leaves of `state` as this setup's live tables and states (updated in place by training)."""
    self.sync()
    self.tables = {i: sparse_tables.get_path(state["params"], p) for i, p in zip(self.blocks, self.paths)}
    self.states = {i: sparse_tables.get_path(state["opt"]["tables"], p) for i, p in zip(self.blocks, self.paths)}
    return state

  def init(self, seed) -> State:
    """A fresh state: device part created on the mesh, tables (same initial values) and their state on the host."""
    dev = self.c["init_device"](seed)
    with jax.default_device(self.c["cpu"]):
      tables = [np.array(t) for t in self.c["init_tables"](jax.device_put(seed, self.c["cpu"]))]  # writable copies
    states = [host_optim.init_state(self.kind, t) for t in tables]
    return self._own(self._full(dev, tables, states))

  def adopt(self, restored: State) -> State:
    """A restored state (host leaves as CPU jax arrays) -> the training state (host leaves as numpy copies)."""
    take = lambda x: np.array(x)  # writable copy
    tables = [take(sparse_tables.get_path(restored["params"], p)) for p in self.paths]
    states = [jax.tree.map(take, sparse_tables.get_path(restored["opt"]["tables"], p)) for p in self.paths]
    dev = {**restored, "opt": {"backbone": restored["opt"]["backbone"]}}  # _full replaces the table leaves
    return self._own(self._full(dev, tables, states))

  def checkpoint_state(self, state: State, step: int | None = None) -> State:
    """The state to save: host leaves copied onto the CPU device (immutable while the save runs). Raises
    guard.NonFiniteError if a host table or its state holds a NaN or inf (never saved)."""
    self.sync()
    for i, p in zip(self.blocks, self.paths):
      for name, x in [("table", self.tables[i])] + sorted(self.states[i].items()):
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
          raise guard.NonFiniteError(f"host table {'.'.join(map(str, p))} ({name}) at step {step} holds non-finite "
                                     "values; not saved. Fix: resume from the last good checkpoint with a lower "
                                     "learning rate.")
    put = lambda x: jax.device_put(np.array(x), self.c["cpu"], may_alias=False)
    tables = [put(self.tables[i]) for i in self.blocks]
    states = [jax.tree.map(put, self.states[i]) for i in self.blocks]
    return self._full(self._device_state(state), tables, states)

  # -------------------------------------------------------------------------------------------- host work

  def sync(self) -> None:
    """Waits for the worker's queued jobs (after it, the host tables hold every applied update)."""
    if self._last is not None:
      self._last.result()
      self._last = None

  def _submit(self, fn, *args):
    self._last = self.worker.submit(fn, *args)
    return self._last

  def prepare(self, batch: dict) -> tuple[dict, dict]:
    """(worker) Hash ids {block: [B, S, H]} and gathered rows {block: [B, S, H, d]} of a batch."""
    t0 = time.perf_counter()
    seg = batch["segment_ids"]
    inputs = shift_right_np(batch["targets"], seg)  # [B, S]
    ids = {i: h.flat_rows(inputs, segment_ids=seg) for i, h in self.hashers.items()}
    t1 = time.perf_counter()
    rows = {i: np.take(self.tables[i], ids[i], axis=0) for i in self.blocks}
    self.times.worker_hash_s += t1 - t0
    self.times.worker_gather_s += time.perf_counter() - t1
    return ids, rows

  def feed(self, train_iter) -> HostFeed:
    """The train iterator, one batch ahead, as HostBatch items for `train_step`."""
    self.feed_ = HostFeed(self, train_iter)
    return self.feed_

  def _send(self, ids: dict, rows: dict) -> dict:
    put = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))
    return {"engram_ids": {i: put(ids[i]) for i in self.blocks}, "engram_rows": {i: put(rows[i]) for i in self.blocks}}

  def _apply(self, i: int, sel, out: dict) -> int:
    """Applies the rows `sel` of table i's update `out` (host arrays from the device step); returns their count."""
    kw = dict(b1=self.optimizer.b1, b2=self.optimizer.b2, eps=self.optimizer.eps)
    scalars = host_optim.StepScalars(out["step_size"], out.get("bc1", np.float32(1)), out.get("bc2", np.float32(1)))
    ids = out["ids"][sel]
    host_optim.apply(self.kind, self.tables[i], self.states[i], ids, out["grads"][sel], scalars,
                     mean_sq=out["mean_sq"][sel] if "mean_sq" in out else None, **kw)
    return ids.size

  def _apply_rest(self, rest: list) -> None:
    t0 = time.perf_counter()
    n = sum(self._apply(i, sel, out) for i, sel, out in rest)
    self.times.worker_update_s += time.perf_counter() - t0
    self.times.rows_updated += n

  def train_step(self, state: State, item: HostBatch) -> tuple[State, dict]:
    """One training step (see the module docstring). state: this setup's state (`init` / `adopt`)."""
    t = self.times
    if item.device is None:  # the first step of a session: nothing was sent ahead
      t0 = time.perf_counter()
      item.device = self._send(*item.prepared.result())
      t.main_wait_worker_s += time.perf_counter() - t0
    counts = {i: np.asarray(self.states[i]["count"], np.int32) for i in self.blocks}
    batch = {**{k: jax.device_put(v, sharding.batch_sharding(self.mesh)) for k, v in item.batch.items()},
             **item.device, "engram_counts": counts}
    dev, metrics = self.c["train_step"](self._device_state(state), batch)
    sent = metrics.pop(HOST_KEY)
    t0 = time.perf_counter()
    sent, finite = jax.device_get((sent, metrics[guard.FINITE]))
    t1 = time.perf_counter()
    t.main_wait_device_s += t1 - t0
    nxt = self.feed_.ahead if self.feed_ is not None else None
    next_ids = next_rows = None
    if nxt is not None:
      next_ids, next_rows = nxt.prepared.result()  # the worker is idle after this (its queue ends here)
      self._last = None
    t2 = time.perf_counter()
    t.main_wait_worker_s += t2 - t1
    rest = []
    if finite:  # a non-finite step updates nothing (guard 'skip_step' keeps the device state; 'stop' raises)
      for i in self.blocks:
        out = {k: np.asarray(v) for k, v in sent[str(i)].items()}
        valid = out["ids"] < self.num_rows[i]  # the fill id V marks unused slots
        if next_ids is None:
          hot = valid
        else:
          mark = self._marks[i]
          flat = next_ids[i].reshape(-1)  # [M] rows batch t+1 reads
          mark[flat] = True
          hot = valid & mark[np.minimum(out["ids"], self.num_rows[i] - 1)]
          mark[flat] = False
        t.rows_updated_main += self._apply(i, hot, out)
        t.rows_updated += int(np.count_nonzero(hot))
        rest.append((i, valid & ~hot, out))
        host_optim.finish_step(self.states[i])
    t3 = time.perf_counter()
    t.main_update_s += t3 - t2
    if nxt is not None:
      if finite:  # batch t+1's positions whose rows this step changed: gather them again
        for i, sel, out in rest:
          hot_ids = out["ids"][(out["ids"] < self.num_rows[i]) & ~sel]  # updated, not left for the worker
          mark = self._marks[i]
          mark[hot_ids] = True
          pos = mark[next_ids[i]]  # [B, S, H]
          mark[hot_ids] = False
          next_rows[i][pos] = self.tables[i][next_ids[i][pos]]
      t4 = time.perf_counter()
      t.main_patch_s += t4 - t3
      nxt.device = self._send(next_ids, next_rows)
      t.main_send_s += time.perf_counter() - t4
    if rest:  # the rows batch t+1 does not read: on the worker, while the device runs step t+1
      self._submit(self._apply_rest, rest)
    t.steps += 1
    self._standins = [sparse_tables.get_path(dev["params"], p) for p in self.paths]
    tables = [self.tables[i] for i in self.blocks]
    states = [self.states[i] for i in self.blocks]
    return self._full(dev, tables, states), metrics

  def eval_step(self, params: dict, rest: dict, batch: dict):
    """steps.make_eval_step's (params, rest, batch) -> (NLL sum, token count), rows gathered from the host tables."""
    self.sync()
    host = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    ids, rows = self.prepare(host)
    standins = self._new_standins()
    return self.c["eval_step"](sparse_tables.with_leaves(params, self.paths, standins), rest,
                               {**batch, "engram_rows": self._send(ids, rows)["engram_rows"]})

  def close(self) -> None:
    self.sync()
    self.worker.shutdown(wait=True)


def make_host_setup(model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh,
                    compression: np.ndarray | None = None, on_nonfinite: str = "stop") -> HostSetup:
  return HostSetup(model_config, optimizer, total_steps, mesh, compression, on_nonfinite)
