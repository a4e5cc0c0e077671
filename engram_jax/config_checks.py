"""Type checks of the frozen config dataclasses: a value of the wrong type (a string for an int, a float step
count) fails with the field named, before any comparison inside a check raises a nameless TypeError.

Pure Python (no jax): the layer configs may call it from __post_init__.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing


@functools.cache
def _hints(cls: type) -> dict[str, typing.Any]:
  return typing.get_type_hints(cls)


def _matches(value, hint) -> bool:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is typing.Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, a) for a in args)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:  # numpy integers count
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_matches(v, args[0]) for v in value)
    return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
  if isinstance(hint, type):
    return isinstance(value, hint)
  return True  # annotations this check does not understand are not checked


def check_types(config, _prefix: str | None = None) -> None:
  """Raises TypeError 'Class.field=value: expected int' for the first field (nested configs included) whose value
  does not match its annotation."""
  cls = type(config)
  for field in dataclasses.fields(config):
    value, hint = getattr(config, field.name), _hints(cls).get(field.name, typing.Any)
    name = f"{_prefix or cls.__name__}.{field.name}"
    if not _matches(value, hint):
      shown = str(hint) if typing.get_args(hint) else getattr(hint, "__name__", str(hint))
      raise TypeError(f"{name}={value!r}: expected {shown} (got {type(value).__name__})")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      check_types(value, name)
