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
import mmap
import os

import ml_dtypes
import numpy as np

from porting.atomic import atomic_file
from porting.errors import CheckpointError, brief, cut

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
_MAX_NDIM = 32
_MAX_EXTENT = 1 << 40  # one dimension (numpy refuses some larger ones even in an empty array)


def looks_like_safetensors(head: bytes) -> bool:
    """Whether the first bytes of a file are a safetensors header (length, then a JSON object)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= _MAX_HEADER


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads every tensor of a safetensors file, as strictly as the safetensors library.

    The file is memory-mapped: the arrays are read-only views of it, not copies. The entries
    must tile the data exactly (sorted by offset, no gap, no overlap, nothing after the last),
    as the library requires.

    Args:
      path: the file.

    Returns:
      (tensors, metadata): name -> read-only numpy array in file (data offset) order, and the
      header's `__metadata__` (empty if absent).

    Raises:
      CheckpointError: truncated file, malformed header, unknown dtype, offsets that do not
        match the shapes or do not tile the data.
    """
    path = os.fspath(path)
    blob = _map(path)
    if len(blob) < 8:
        raise CheckpointError(path, f"truncated safetensors file ({len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise CheckpointError(path, f"truncated safetensors file: header of {n} bytes, file of {len(blob)}")
    if blob[8:9] != b"{":
        raise CheckpointError(path, "malformed safetensors header: it does not start with '{'")
    try:
        header = json.loads(str(blob[8 : 8 + n], "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(path, f"malformed safetensors header ({type(e).__name__}: {cut(str(e), 120)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "malformed safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "malformed safetensors header: __metadata__ must map strings to strings")
    buffer = blob[8 + n :]
    entries = sorted((_entry_offsets(path, name, info), name, info) for name, info in header.items())
    end = 0
    for (begin, stop), name, _ in entries:
        if begin != end:
            raise CheckpointError(path, f"malformed safetensors file: the entries overlap or leave a gap at {cut(name)} "
                                        f"(data_offsets [{begin}, {stop}], the previous entry ends at {end})")
        end = stop
    if end > len(buffer):
        raise CheckpointError(path, f"truncated safetensors file: the entries end at byte {end:,} of {len(buffer):,} data bytes")
    if end != len(buffer):
        raise CheckpointError(path, f"malformed safetensors file: the entries overlap or leave a gap: they end at byte "
                                    f"{end:,} of {len(buffer):,} data bytes")
    tensors: dict[str, np.ndarray] = {}
    for (begin, _), name, info in entries:
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        tensors[name] = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=begin).reshape(shape)
    return tensors, dict(metadata)


def _map(path: str) -> memoryview:
    """The file mapped read-only (an empty view for an empty file)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None


def _entry_offsets(path: str, name: str, info) -> tuple[int, int]:
    def bad(problem):
        return CheckpointError(path, f"malformed safetensors entry {cut(name)}: {problem}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str or dtype not in _DTYPES:
        raise bad(f"unsupported dtype {brief(dtype)} (supported: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(type(d) is int and 0 <= d < _MAX_EXTENT for d in shape):
        raise bad(f"shape must be a list of at most {_MAX_NDIM} ints in [0, 2**40), got {brief(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets must be two ints, got {brief(offsets)}")
    if math.prod(d for d in shape if d) >= _MAX_EXTENT:  # numpy has no such shape, even empty
        raise bad(f"shape {shape} describes 2**40 elements or more")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise bad(f"data_offsets [{brief(begin)}, {brief(end)}] do not hold the {brief(nbytes)} bytes of its shape")
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
