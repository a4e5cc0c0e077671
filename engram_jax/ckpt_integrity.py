"""Checkpoint integrity: a checksum manifest per step, written after orbax has committed the step, verified before
a restore. A truncated, deleted or altered file is then reported by path instead of crashing deep inside
tensorstore, or restoring silently wrong values (a flipped byte in an optimizer-moment chunk decodes fine).

<step>/engram_integrity.json = {"format": 1, "step": N, "files": {relative path: {"bytes": n, "sha256": hex}}}
Steps without a manifest (written by older versions, or a crash between commit and manifest) are "unverified":
restored if orbax can read them.
"""

from __future__ import annotations

import hashlib

from etils import epath

from engram_jax import fileio

MANIFEST = "engram_integrity.json"
FORMAT = 1


class CorruptCheckpointError(ValueError):
  """A checkpoint step whose files do not match its manifest (or that orbax cannot read)."""


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
  out = {}
  for root, _, names in step_dir.walk():
    for name in names:
      path = root / name
      rel = str(path.relative_to(step_dir))
      if rel != MANIFEST:
        out[rel] = path
  return out


def _sha256(path: epath.Path) -> tuple[int, str]:
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
      size += len(block)
  return size, h.hexdigest()


def write_manifest(step_dir, step: int) -> dict:
  """Hashes every file of a committed step and writes the manifest (atomically) into it."""
  step_dir = fileio.as_path(step_dir)
  files = {}
  for rel, path in sorted(_files(step_dir).items()):
    size, digest = _sha256(path)
    files[rel] = {"bytes": size, "sha256": digest}
  manifest = {"format": FORMAT, "step": int(step), "files": files}
  fileio.write_json(step_dir / MANIFEST, manifest)
  return manifest


def has_manifest(step_dir) -> bool:
  return (fileio.as_path(step_dir) / MANIFEST).exists()


def problems(step_dir) -> list[str]:
  """What is wrong with a step directory against its manifest ([] when intact or when it has no manifest)."""
  step_dir = fileio.as_path(step_dir)
  if not (step_dir / MANIFEST).exists():
    return []
  try:
    listed = fileio.read_json(step_dir / MANIFEST)["files"]
  except (OSError, ValueError, KeyError) as e:
    return [f"{step_dir / MANIFEST}: unreadable manifest ({e})"]
  present = _files(step_dir)
  out = []
  for rel, want in sorted(listed.items()):
    path = step_dir / rel
    if rel not in present:
      out.append(f"{path}: missing")
      continue
    size, digest = _sha256(path)
    if size != want["bytes"]:
      out.append(f"{path}: {size} bytes, expected {want['bytes']} (truncated or overwritten)")
    elif digest != want["sha256"]:
      out.append(f"{path}: sha256 differs from the manifest (the file was altered)")
  return out


def check(step_dir) -> None:
  """Raises CorruptCheckpointError naming every bad file of the step."""
  found = problems(step_dir)
  if found:
    raise CorruptCheckpointError(f"checkpoint {fileio.as_path(step_dir)} is corrupt:\n  " + "\n  ".join(found))
