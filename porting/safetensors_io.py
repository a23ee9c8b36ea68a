"""Safetensors files: a strict reader (with precise errors, bfloat16 included) and an atomic writer.

Layout: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the raw little-endian tensor bytes (offsets relative to the end of the header).
The same reader serves torch-keyed files (`safetensors.torch.save_file(model.state_dict())`)
and the Flax-keyed files that `porting.export` writes.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from porting.atomic import atomic_file
from porting.errors import CheckpointError

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def looks_like_safetensors(head: bytes) -> bool:
    """Whether the first bytes of a file are a safetensors header (length, then a JSON object)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= _MAX_HEADER


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads every tensor of a safetensors file.

    Args:
      path: the file.

    Returns:
      (tensors, metadata): name -> read-only numpy array in file (data offset) order, and the
      header's `__metadata__` (empty if absent).

    Raises:
      CheckpointError: truncated file, malformed header, unknown dtype, offsets that do not
        match the shapes.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    if len(blob) < 8:
        raise CheckpointError(path, f"truncated safetensors file ({len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise CheckpointError(path, f"truncated safetensors file: header of {n} bytes, file of {len(blob)}")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "malformed safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "malformed safetensors header: __metadata__ must map strings to strings")
    buffer = memoryview(blob)[8 + n :]
    entries = []
    for name, info in header.items():
        entries.append((_entry_offsets(path, name, info, len(buffer)), name, info))
    tensors: dict[str, np.ndarray] = {}
    for (begin, _), name, info in sorted(entries, key=lambda e: e[0]):
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        array = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=begin).reshape(shape)
        tensors[name] = array
    return tensors, dict(metadata)


def _entry_offsets(path: str, name: str, info, size: int) -> tuple[int, int]:
    def bad(problem):
        return CheckpointError(path, f"malformed safetensors entry {name}: {problem}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("needs dtype, shape and data_offsets")
    if info["dtype"] not in _DTYPES:
        raise bad(f"unsupported dtype {info['dtype']!r:.20} (supported: {', '.join(_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r:.60}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets must be two ints, got {offsets!r:.60}")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[info["dtype"]].itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise bad(f"data_offsets {offsets} do not hold {nbytes} bytes of shape {shape}")
    if end > size:
        raise CheckpointError(path, f"truncated safetensors file: {name} ends at byte {end} of {size} data bytes")
    return begin, end


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Writes `tensors` (contiguous, little-endian) with `metadata`, atomically.

    Args:
      path: destination file; replaced only once the new file is complete.
      tensors: name -> numpy array.
      metadata: string -> string pairs stored in the header's `__metadata__`.
    """
    from safetensors.numpy import save_file

    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
