"""A small reader and writer of the safetensors format, with the fp8 dtypes the `safetensors` numpy API lacks.

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {str: str}}, then the raw little-endian bytes of every tensor. Reading memory-maps the file,
so a 100 GB table is not loaded until its rows are touched. Writing goes to a unique temp file renamed into place
(a crash never leaves a half-written file under the final name).

Directories of shards with a `model.safetensors.index.json` (`{"weight_map": {name: shard file}}`) are read as
one mapping (`open_tensors`).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


def _header(path: Path) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 * 2**20:
      raise ValueError(f"{path}: safetensors header of {n} bytes; not a safetensors file?")
    header = json.loads(f.read(n))
  return header, 8 + n


def read_metadata(path: str | Path) -> dict[str, str]:
  """The file's `__metadata__` (string -> string), {} when absent."""
  return dict(_header(Path(path))[0].get("__metadata__") or {})


class SafetensorsFile(Mapping):
  """Read-only mapping name -> np.ndarray (memory-mapped) over one safetensors file."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    header, self._start = _header(self.path)
    self.metadata = dict(header.pop("__metadata__", None) or {})
    self._entries = header
    for name, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")

  def __getitem__(self, name: str) -> np.ndarray:
    e = self._entries[name]
    dt, shape = DTYPES[e["dtype"]], tuple(e["shape"])
    begin, end = e["data_offsets"]
    if end - begin != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} of {e['dtype']}")
    if end == begin:
      return np.zeros(shape, dt)
    return np.memmap(self.path, dtype=dt, mode="r", offset=self._start + begin, shape=shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def dtype_name(self, name: str) -> str:
    return self._entries[name]["dtype"]


class ShardedSafetensors(Mapping):
  """Read-only mapping over a directory of shards listed by `model.safetensors.index.json`."""

  def __init__(self, directory: str | Path):
    self.path = Path(directory)
    index = json.loads((self.path / INDEX_FILE).read_text())
    self._where = dict(index["weight_map"])
    self._files: dict[str, SafetensorsFile] = {}
    self.metadata = dict(index.get("metadata") or {})

  def _file(self, name: str) -> SafetensorsFile:
    shard = self._where[name]
    if shard not in self._files:
      self._files[shard] = SafetensorsFile(self.path / shard)
    return self._files[shard]

  def __getitem__(self, name: str) -> np.ndarray:
    return self._file(name)[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def dtype_name(self, name: str) -> str:
    return self._file(name).dtype_name(name)


def open_tensors(path: str | Path) -> SafetensorsFile | ShardedSafetensors:
  """A safetensors file, or a directory holding `model.safetensors.index.json` and its shards."""
  p = Path(path)
  if p.is_dir():
    if not (p / INDEX_FILE).is_file():
      raise FileNotFoundError(f"{p}: a directory of safetensors shards needs {INDEX_FILE}")
    return ShardedSafetensors(p)
  if not p.is_file():
    raise FileNotFoundError(f"no such safetensors file or directory: {str(p)!r}")
  return SafetensorsFile(p)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (numpy arrays of the dtypes in DTYPES) atomically; tensors are stored in name order."""
  path = Path(path)
  entries, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ValueError(f"write_safetensors: tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
    a = np.ascontiguousarray(a)  # native order; safetensors is little-endian, as every platform JAX runs on
    entries[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
      raise ValueError(f"write_safetensors: metadata must map str to str; fix {bad}")
    entries["__metadata__"] = dict(metadata)
  header = json.dumps(entries, separators=(",", ":")).encode()
  header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(header)))
      f.write(header)
      for a in arrays:
        f.write(memoryview(a.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
