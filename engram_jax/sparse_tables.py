"""Row-sparse Engram table gradients and the sparse table optimizers (step cost O(tokens), not O(table rows)).

A step reads M = B * S * H rows per Engram layer, whatever the table's size V. Differentiating with respect to the
gathered rows [B, S, H, d] instead of the table [V, d] gives a gradient of M rows; `row_grads` sums the duplicates
into (unique row ids, summed row gradients) of static size M (unused slots hold the fill id V and a zero gradient),
and `apply_rows` updates only those rows of the table and of its optimizer state. On a mesh every row shard
all-gathers the step's ids and row gradients over the batch axes (a collective sized by the tokens, never by V),
keeps the rows it owns and updates its own shard in place.

Table optimizers (OptimizerConfig.table_optimizer):
  'adam_dense'       optax Adam on the dense [V, d] gradient (the paper's optimizer; the reference, not here);
  'sgd'              row -= lr * g for touched rows (equal to dense SGD: an untouched row's gradient is zero);
  'adam_lazy'        TF LazyAdam semantics: a step updates the first and second moments and the parameters of the
                     rows it touched, and only those; untouched rows keep their moments (no decay while unread) and
                     their values. Bias correction uses the global step count t (as LazyAdam does):
                       m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
                       row -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   for touched rows.
                     On a step that touches every row this is dense Adam. Both moments of a row sit side by side
                     in one array 'moments' [V, 2, d] (first, second), so a touched row's state is one contiguous
                     256-byte read and write (at d = 32) instead of two scattered ones.
  'adagrad_rowwise'  one accumulator per row (DLRM / FBGEMM row-wise Adagrad; 1/d of Adam's state per row):
                       a = a + mean_j(g_j^2),  row -= lr * g / (sqrt(a) + eps)                for touched rows.
No weight decay on either sparse optimizer. The learning rate is the table group's (multiplier x the backbone
schedule), evaluated at the table state's own update count, as optax does for the dense groups.
`apply_rows(..., keep=ok)` leaves table and state bit-identical when ok is False (the guard's skipped step) at a
cost of the touched rows only: the rows are rewritten with their old values and the count does not advance.

Letters: B batch, S sequence, H hash heads, d row width, V table rows, M = B * S * H rows read per step,
n row shards, U = M unique-row slots per shard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import sharding

SPARSE_OPTIMIZERS = ("adam_lazy", "adagrad_rowwise", "sgd")


class RowGrads(NamedTuple):
  """The row-sparse gradient of one table, per row shard."""

  ids: jax.Array  # [n, U] int32 rows of the flat table owned by shard i, sorted; unused slots hold V (the fill id)
  grads: jax.Array  # [n, U, d] summed gradient of each row (zero in unused slots)


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def dedup_rows(ids: jax.Array, grads: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """Sum the gradients of equal ids. ids [M] int32, grads [M, d] -> (unique ids [M] sorted, then `fill` in the
  unused slots; summed gradients [M, d], zero in the unused slots). Entries whose id is `fill` must carry a zero
  gradient (they collect into one slot, which the update drops)."""
  m = ids.shape[0]
  order = jnp.argsort(ids)  # [M]
  sorted_ids = ids[order]  # [M]
  new = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])  # [M] first of a run
  seg = jnp.cumsum(new.astype(jnp.int32)) - 1  # [M] index of the unique id
  uids = jnp.full((m,), fill, ids.dtype).at[seg].set(sorted_ids)  # [M]
  sums = jax.ops.segment_sum(grads[order], seg, num_segments=m, indices_are_sorted=True)  # [M, d]
  return uids, sums


def lazy_adam_rows(rows: jax.Array, mu: jax.Array, nu: jax.Array, g: jax.Array, step_size: jax.Array,
                   count: jax.Array, b1: float, b2: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Adam on the touched rows only. rows, mu, nu, g [U, d]; step_size = -lr; count = t (updates so far, this one
  included) -> (parameter update [U, d], mu' [U, d], nu' [U, d]). Same operations as optax.scale_by_adam."""
  mu = (1 - b1) * g + b1 * mu
  nu = (1 - b2) * jnp.square(g) + b2 * nu
  t = count.astype(g.dtype)
  mu_hat = mu / (1 - b1 ** t)
  nu_hat = nu / (1 - b2 ** t)
  return mu_hat / (jnp.sqrt(nu_hat) + eps) * step_size, mu, nu


def adagrad_rowwise_rows(acc: jax.Array, g: jax.Array, step_size: jax.Array, eps: float
                         ) -> tuple[jax.Array, jax.Array]:
  """Row-wise Adagrad. acc [U] (one accumulator per row), g [U, d]; step_size = -lr -> (update [U, d], acc' [U])."""
  acc = acc + jnp.mean(jnp.square(g), axis=-1)  # [U]
  return g / (jnp.sqrt(acc)[:, None] + eps) * step_size, acc


# ----------------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------------


def state_bytes_per_row(kind: str, head_dim: int, dtype_bytes: int = 4) -> int:
  """Optimizer-state bytes per table row: 'adam_dense' / 'adam_lazy' 2 d, 'adagrad_rowwise' 1, 'sgd' 0 (x4 bytes)."""
  per_row = {"adam_dense": 2 * head_dim, "adam": 2 * head_dim, "adam_lazy": 2 * head_dim, "adagrad_rowwise": 1,
             "sgd": 0}
  if kind not in per_row:
    raise ValueError(f"table optimizer {kind!r}: use one of {sorted(per_row)}")
  return per_row[kind] * dtype_bytes


ROW_KEYS = {"adam_lazy": ("moments",), "adagrad_rowwise": ("acc",), "sgd": ()}  # per-row state arrays


def init_state(kind: str, table: jax.Array) -> dict[str, jax.Array]:
  """Fresh state of one table [V, d]: adam_lazy {'moments' [V, 2, d] (first, second moment), 'count'},
  adagrad_rowwise {'acc' [V], 'count'}, sgd {'count'}."""
  count = jnp.zeros((), jnp.int32)
  if kind == "adam_lazy":
    return {"moments": jnp.zeros((table.shape[0], 2) + table.shape[1:], table.dtype), "count": count}
  if kind == "adagrad_rowwise":
    return {"acc": jnp.zeros(table.shape[:1], table.dtype), "count": count}
  if kind == "sgd":
    return {"count": count}
  raise ValueError(f"sparse table optimizer {kind!r}: use one of {SPARSE_OPTIMIZERS}")


def check_state_layout(kind: str, state: Mapping) -> None:
  """A clear error for a table state of another layout (e.g. adam_lazy's separate 'mu'/'nu' of earlier versions)."""
  want = set(ROW_KEYS[kind]) | {"count"}
  if set(state) != want:
    raise ValueError(f"table_optimizer={kind!r} state has keys {sorted(state)}, this version expects {sorted(want)}"
                     " (adam_lazy keeps both moments in one 'moments' [V, 2, d] array). Fix: resume with the "
                     "engram_jax version that wrote it, or start a new MODEL_DIR.")


def state_shardings(kind: str, table_sharding: NamedSharding) -> dict[str, NamedSharding]:
  """Shardings of `init_state(kind, table)`: row arrays follow the table's row sharding, the count is replicated."""
  mesh, spec = table_sharding.mesh, table_sharding.spec
  rows = NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None))
  replicated = NamedSharding(mesh, PartitionSpec())
  if kind == "adam_lazy":
    return {"moments": NamedSharding(mesh, PartitionSpec(*spec[:1], None, *spec[1:])), "count": replicated}
  if kind == "sgd":
    return {"count": replicated}
  return {"acc": rows, "count": replicated}


# ----------------------------------------------------------------------------------------------------------------
# Mesh plumbing
# ----------------------------------------------------------------------------------------------------------------


def _axes(mesh: Mesh, logical: str, rules: sharding.Rules) -> tuple[str, ...]:
  return tuple(a for a in sharding.mesh_axes(logical, rules) if mesh.shape[a] > 1)


def _spec(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _layout(mesh: Mesh, rules: sharding.Rules, batch: int):
  """(row axes, batch axes the ids arrive split over, number of row shards)."""
  table_axes = _axes(mesh, "table_rows", rules)
  batch_axes = _axes(mesh, "batch", rules)
  n = math.prod(mesh.shape[a] for a in table_axes)
  if batch % math.prod(mesh.shape[a] for a in batch_axes) or not set(batch_axes) <= set(table_axes):
    batch_axes = ()  # the ids come replicated (GSPMD gathers them: a collective sized by the tokens)
  return table_axes, batch_axes, n


def _own(ids: jax.Array, grads: jax.Array, valid: jax.Array, lo, rows_local: int, fill: int):
  """Flatten and keep the rows in [lo, lo + rows_local): ids [B, S, H], grads [B, S, H, d], valid [B, S]
  -> (ids [M] with `fill` elsewhere, grads [M, d] zero elsewhere)."""
  own = valid[:, :, None] & (ids >= lo) & (ids < lo + rows_local)  # [B, S, H]
  flat_ids = jnp.where(own, ids, fill).reshape(-1)  # [M]
  flat_g = jnp.where(own[..., None], grads, jnp.zeros((), grads.dtype)).reshape(flat_ids.shape[0], -1)  # [M, d]
  return flat_ids, flat_g


def row_grads(ids: jax.Array, grads: jax.Array, valid: jax.Array, num_rows: int, mesh: Mesh | None = None,
              rules: sharding.Rules = sharding.DEFAULT_RULES) -> RowGrads:
  """Row gradient of one table from the gradient w.r.t. its gathered rows: ids [B, S, H] rows of the flat table,
  grads [B, S, H, d], valid [B, S] bool (False: padding, which touches no row) -> RowGrads with n row shards
  (n = 1 without a mesh) of U = B * S * H slots each."""
  if mesh is None:
    uids, sums = dedup_rows(*_own(ids, grads, valid, 0, num_rows, num_rows), num_rows)
    return RowGrads(uids[None], sums[None])
  table_axes, batch_axes, n = _layout(mesh, rules, ids.shape[0])
  rows_local = num_rows // n

  def local(ids, grads, valid):  # [B/b, S, H], [B/b, S, H, d], [B/b, S]
    if batch_axes:  # every row shard sees the whole step's ids: O(tokens) bytes
      ids, grads, valid = (jax.lax.all_gather(x, batch_axes, axis=0, tiled=True) for x in (ids, grads, valid))
    lo = jax.lax.axis_index(table_axes) * rows_local if table_axes else 0
    uids, sums = dedup_rows(*_own(ids, grads, valid, lo, rows_local, num_rows), num_rows)
    return uids[None], sums[None]  # [1, U], [1, U, d]

  batch_spec = PartitionSpec(_spec(batch_axes))
  out_spec = PartitionSpec(_spec(table_axes))
  uids, sums = jax.shard_map(local, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec),
                             out_specs=(out_spec, out_spec), check_vma=False)(ids, grads, valid)
  return RowGrads(uids, sums)


def apply_rows(kind: str, table: jax.Array, state: Mapping[str, jax.Array], grad: RowGrads, lr: jax.Array, *,
               b1: float, b2: float, eps: float, mesh: Mesh | None = None,
               rules: sharding.Rules = sharding.DEFAULT_RULES, keep: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One sparse step of `kind` on table [V, d] with its state: only the rows in `grad` change (on a mesh, each
  row shard updates its own rows; no collective). lr: the table group's learning rate of this step. keep: bool
  scalar, False -> table and state come back bit-identical (the touched rows are rewritten with their old values,
  the count stays): a skipped step at O(touched rows)."""
  if kind not in SPARSE_OPTIMIZERS:
    raise ValueError(f"sparse table optimizer {kind!r}: use one of {SPARSE_OPTIMIZERS}")
  check_state_layout(kind, state)
  keep = jnp.ones((), bool) if keep is None else keep
  count = jnp.where(keep, state["count"] + 1, state["count"])
  step_size = -lr.astype(table.dtype)
  rows_keys = ROW_KEYS[kind]
  n = 1 if mesh is None else _layout(mesh, rules, 1)[2]
  rows_local = table.shape[0] // n

  def local(tab, slots, uids, g, lo_index, keep):  # [V/n, d], {k: [V/n, ...]}, [1, U], [1, U, d], scalar, bool
    loc = uids[0] - lo_index * rows_local  # [U]; the fill id lands past the shard and is dropped
    g = g[0]
    get = lambda x: x.at[loc].get(mode="fill", fill_value=0)
    rows = get(tab)  # [U, d]
    if kind == "adam_lazy":
      old = {"moments": get(slots["moments"])}  # [U, 2, d]
      upd, mu, nu = lazy_adam_rows(rows, old["moments"][:, 0], old["moments"][:, 1], g, step_size, count, b1, b2,
                                   eps)
      new = {"moments": jnp.stack([mu, nu], axis=1)}
    elif kind == "adagrad_rowwise":
      old = {"acc": get(slots["acc"])}  # [U]
      upd, acc = adagrad_rowwise_rows(old["acc"], g, step_size, eps)
      new = {"acc": acc}
    else:  # sgd
      old, new, upd = {}, {}, g * step_size
    # rows + upd is the same float sum as a scatter-add (the ids in `loc` are unique); `set` keeps a skipped row's
    # bits (an add of 0 would turn -0.0 into +0.0)
    put = lambda x, n, o: x.at[loc].set(jnp.where(keep, n, o), mode="drop")
    tab = put(tab, rows + upd, rows)
    return tab, {k: put(slots[k], new[k], old[k]) for k in rows_keys}

  slots = {k: state[k] for k in rows_keys}
  if mesh is None:
    tab, slots = local(table, slots, grad.ids, grad.grads, 0, keep)
  else:
    table_axes = _axes(mesh, "table_rows", rules)
    rows_spec = PartitionSpec(_spec(table_axes))
    specs = {"table": PartitionSpec(_spec(table_axes), None), "moments": PartitionSpec(_spec(table_axes), None, None),
             "acc": rows_spec}

    def sharded(tab, slots, uids, g, keep):
      return local(tab, slots, uids, g, jax.lax.axis_index(table_axes) if table_axes else 0, keep)

    slot_specs = {k: specs[k] for k in rows_keys}
    tab, slots = jax.shard_map(sharded, mesh=mesh,
                               in_specs=(specs["table"], slot_specs, rows_spec, rows_spec, PartitionSpec()),
                               out_specs=(specs["table"], slot_specs), check_vma=False)(table, slots, grad.ids,
                                                                                       grad.grads, keep)
  return tab, {**slots, "count": count}


# ----------------------------------------------------------------------------------------------------------------
# Tables inside the params tree (pure nested dicts)
# ----------------------------------------------------------------------------------------------------------------

Path = tuple  # keys from the params root to a table leaf, e.g. ('blocks', 1, 'engram', 'table')


def get_path(tree: dict, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def without(tree: dict, paths: list[Path]) -> dict:
  """A copy of a nested dict with the leaves at `paths` removed (the backbone's tree)."""
  out = dict(tree)
  for head in {p[0] for p in paths}:
    rest = [p[1:] for p in paths if p[0] == head]
    out[head] = without(out[head], rest) if all(rest) else None
    if out[head] is None:
      del out[head]
  return out


def with_leaves(tree: dict, paths: list[Path], leaves: list) -> dict:
  """A copy of a nested dict (or {}) with `leaves` set at `paths` (the inverse of `without`)."""
  out = dict(tree)
  for path, leaf in zip(paths, leaves):
    node = out
    for key in path[:-1]:
      node[key] = dict(node.get(key, {}))
      node = node[key]
    node[path[-1]] = leaf
  return out


# ----------------------------------------------------------------------------------------------------------------
# The train step's view: every Engram table of a decoder
# ----------------------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
  """Where a decoder's tables are and how they are updated (built once per setup; static under jit)."""

  kind: str  # 'adam_lazy' | 'adagrad_rowwise' | 'sgd'
  blocks: tuple[int, ...]  # decoder block index of each Engram layer
  paths: tuple[Path, ...]  # params path of each layer's table
  b1: float
  b2: float
  eps: float
  mesh: Mesh | None
  rules: tuple

  @classmethod
  def of(cls, model, kind: str, b1: float, b2: float, eps: float, mesh: Mesh | None) -> Plan:
    """The plan for a Decoder (abstract or concrete): one entry per Engram layer."""
    blocks = tuple(i for i, b in enumerate(model.blocks) if b.engram is not None)
    rules = tuple(model.blocks[blocks[0]].engram.rules) if blocks else tuple(sharding.DEFAULT_RULES)
    return cls(kind, blocks, tuple(("blocks", i, "engram", "table") for i in blocks), b1, b2, eps, mesh, rules)

  def gather(self, model, inputs: jax.Array, segment_ids: jax.Array) -> tuple[dict, dict]:
    """Hash and read every layer's rows (forward only; the layer's lookup strategy): inputs, segment_ids [B, S]
    -> ({block: ids [B, S, H]}, {block: rows [B, S, H, d]})."""
    ids, rows = {}, {}
    for i in self.blocks:
      engram = model.blocks[i].engram
      hash_ids = engram.hash(inputs, segment_ids)  # [B, S, H]
      ids[i] = engram.flat_rows(hash_ids)  # [B, S, H]
      rows[i] = engram.retrieve(hash_ids).reshape(ids[i].shape + (-1,))  # [B, S, H, d]
    return ids, rows

  def row_grads(self, ids: dict, grads: dict, valid: jax.Array, tables: list) -> list[RowGrads]:
    """Per table: the gradient w.r.t. its gathered rows -> RowGrads (padding tokens touch nothing)."""
    return [row_grads(ids[i], grads[i], valid, t.shape[0], self.mesh, self.rules)
            for i, t in zip(self.blocks, tables)]

  def apply(self, tables: list, states: list, grads: list[RowGrads], lr_fn, keep: jax.Array | None = None
            ) -> tuple[list, list]:
    """One sparse step of every table at learning rate lr_fn(updates so far): (new tables, new states); keep=False
    leaves every table and state as it was (`apply_rows`)."""
    out = [apply_rows(self.kind, t, s, g, lr_fn(s["count"]), b1=self.b1, b2=self.b2, eps=self.eps, mesh=self.mesh,
                      rules=self.rules, keep=keep) for t, s, g in zip(tables, states, grads)]
    return [t for t, _ in out], [s for _, s in out]
