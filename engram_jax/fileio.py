"""File I/O shared by every writer of a run directory: paths that may be local or `gs://` (through etils.epath,
as orbax uses), and one `atomic_write`.

`atomic_write` writes a temporary file with a name unique to this host, process and call, then renames it over the
target: a reader sees the old file or the new one, never half of one, and processes sharing a directory never
write the same temporary file. Object stores (gs://) have no rename but make each object write atomic, so there
the data goes straight to its name.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any

from etils import epath

PathLike = str | os.PathLike | epath.Path


def as_path(path: PathLike) -> epath.Path:
  """A local or gs:// path as an etils.epath.Path (local paths are made absolute)."""
  text = os.fspath(path)
  return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(text))


def is_remote(path: PathLike) -> bool:
  """True for object-store URLs (gs://, s3://, ...): no atomic rename, no local file handle."""
  return "://" in os.fspath(path)


def _temp_name(path: epath.Path) -> epath.Path:
  tag = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  return path.parent / f".{path.name}.{tag}.tmp"


def atomic_write(path: PathLike, data: bytes | str) -> epath.Path:
  """Writes `data` to `path` all at once (see the module docstring); returns the path."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  if is_remote(path):
    path.write_bytes(payload)
    return path
  tmp = _temp_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_json(path: PathLike, obj: Any) -> epath.Path:
  """atomic_write of `obj` as indented JSON; non-finite floats are refused (JSON has no NaN), never written bare."""
  return atomic_write(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Any:
  return json.loads(as_path(path).read_text())
