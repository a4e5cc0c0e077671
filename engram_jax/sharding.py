"""Device meshes, logical axis rules and sharding of NNX state by its annotations.

Parameters are annotated with *logical* axis names (e.g. ('table_rows', 'table_dim')) through `param(...)`;
a rules table maps each logical name to zero or more mesh axes. The same model code then runs on one CPU,
a fake 8-device CPU mesh, or a TPU pod; only the mesh spec and (rarely) the rules change.

Mesh axes are always ('data', 'expert', 'model'); an axis absent from the spec has size 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")

# Logical name -> mesh axes. Data parallelism runs over 'data' and 'expert' together (experts are sharded
# over 'expert', tokens over both), tensor parallelism over 'model'. Engram table rows are spread over every
# device so the table's memory scales with the whole mesh.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),
    ("sequence", None),
    ("embed", None),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("experts", "expert"),
    ("expert_mlp", "model"),
    ("table_rows", ("data", "expert", "model")),
    ("table_dim", None),
    ("branches", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
  """'data=2,expert=4' (or a dict) -> sizes of all MESH_AXES; one axis may be -1 (fill the rest)."""
  if isinstance(spec, str):
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      name, sep, value = part.partition("=")
      if not sep:
        raise ValueError(f"mesh spec {spec!r}: expected 'axis=size' pairs like 'data=2,expert=4', got {part!r}")
      sizes[name.strip()] = int(value)
  else:
    sizes = dict(spec)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh spec: unknown axes {sorted(unknown)}; use only {MESH_AXES}")
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh spec: at most one axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh spec: {num_devices} devices are not divisible by the fixed axes' product {known}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
        f"mesh spec {sizes} uses {math.prod(sizes.values())} devices but {num_devices} are available; "
        "fix the sizes or set one axis to -1")
  return sizes


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over MESH_AXES with Auto axis types (GSPMD propagation; shard_map where we take control)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def param(value: jax.Array, *logical_axes: str | None) -> nnx.Param:
  """An nnx.Param annotated with logical axis names (one per dimension), sharded later by `shard_state`."""
  if len(logical_axes) != np.ndim(value):
    raise ValueError(f"param: {len(logical_axes)} logical axes {logical_axes} for a value of shape {np.shape(value)}")
  return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def mesh_axes(logical: str | None, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to (possibly empty)."""
  if logical is None:
    return ()
  for name, target in rules:
    if name == logical:
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  raise KeyError(f"logical axis {logical!r} has no rule; add it to the sharding rules")


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Logical axis names -> PartitionSpec. Mesh axes of size 1 (when `mesh` is given) are dropped."""
  used: set[str] = set()
  out = []
  for logical in logical_axes:
    axes = tuple(a for a in mesh_axes(logical, rules) if mesh is None or mesh.shape[a] > 1)
    if used & set(axes):
      raise ValueError(f"logical axes {tuple(logical_axes)} map mesh axes {sorted(used & set(axes))} twice")
    used |= set(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedSharding for every leaf of an NNX state, from its logical annotations (unannotated: replicated)."""

  def one(var):
    if isinstance(var, nnx.Variable):
      names = var.get_metadata().get("out_sharding")
      shape = np.shape(var.get_value())
      if not names:
        names = (None,) * len(shape)
      spec = logical_to_spec(names, rules, mesh)
      for dim, axes in zip(shape, spec):
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        if dim % size:
          raise ValueError(f"dimension {dim} of a parameter with axes {names} is not divisible by mesh size {size} "
                           f"of {axes}; pick sizes divisible by the mesh or change the rules")
      return var.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Places a module's state on `mesh` by its annotations, in place; returns the module."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(module, jax.device_put(state, shardings))
  return module


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [B, ...] input batch: batch over the data axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
