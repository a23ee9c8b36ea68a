"""A restricted, bounded reader of `torch.save(state_dict)` files (zip format) that never imports torch.

A torch checkpoint is a zip archive `<name>/data.pkl` + `<name>/data/<key>` + `<name>/byteorder`
(+ version records). Reading one costs about what its size says, whatever its bytes:

* the zip's central directory is parsed with the checks of torch's own reader
  (`zip_directory.py`), and records are located in a memory map of the file (local header
  checked against the central one, CRC-32 checked), so storages are read-only views of the
  mapped file, never copies; as in torch, the first record's folder holds the archive and a
  version record (1 to 10) is required;
* every record must be stored uncompressed, as torch writes them: a deflated record could
  expand to a thousand times its size, so it is refused before anything is expanded;
* `data.pkl` runs in `restricted_pickle`, an interpreter with an opcode allow-list, a global
  allow-list (inert markers: nothing from the file is imported or called), and limits on
  memo, stack and nesting;
* each storage reference `('storage', <FloatStorage & co>, key, location, numel)` becomes a
  view of record `data/<key>` (its size must be exactly numel elements); the location
  (`'cpu'`, `'cuda:0'`, ...) is ignored, so tensors saved from a GPU load on the CPU;
* `_rebuild_tensor_v2(storage, offset, size, stride, ...)` becomes a strided numpy view of
  that storage, bounds-checked before it is made, so views, transposes, slices with offsets
  and storages shared by several tensors come back exactly as `torch.load` gives them; the
  tensors together may describe at most `MAX_VIEW_RATIO` times the stored elements (views
  cost nothing here, but whoever converts them to a model pays for every element).

Every failure is a `CheckpointError` whose message describes, never prints, the file's data.
Supported storage dtypes: float32, float16, bfloat16 (via `ml_dtypes`), float64 and the
integer/bool types. The older non-zip ("legacy") format is recognised and refused with a
message that says how to re-save the file.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct

import ml_dtypes
import numpy as np
from zlib_ng.zlib_ng import crc32  # zlib's CRC-32 (the zip format's), computed with SIMD instructions

from porting import restricted_pickle as rp
from porting.errors import CheckpointError, brief, cut
from porting.zip_directory import Entry, ZipError, read_directory

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
# torch's legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2).
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

MIN_VERSION, MAX_VERSION = 1, 10  # torch's kMinSupportedFileFormatVersion, kMaxSupportedFileFormatVersion
MAX_PICKLE = 64 << 20  # bytes of data.pkl (a state dict needs about 150 per tensor)
MAX_NDIM = 32
MAX_EXTENT = 1 << 40  # largest size, stride or offset of one dimension
MAX_VIEW_RATIO = 4  # elements described by all tensors / elements stored, beyond MIN_VIEW_ELEMENTS
MIN_VIEW_ELEMENTS = 1 << 16

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_TYPES = {rp.Global("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()}
_GLOBALS = {(g.module, g.name): g for g in (rp.ORDERED_DICT, rp.REBUILD_TENSOR, rp.REBUILD_PARAMETER,
                                            rp.REBUILD_PARAMETER_WITH_STATE, *_STORAGE_TYPES)}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


class _Tensor:
    """A rebuilt tensor: holds its numpy array until the state dict is handed out."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Storage:
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _extents(value, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or len(value) > MAX_NDIM:
        raise rp.Refused(f"tensor {what} must be a tuple of at most {MAX_NDIM} ints, got {brief(value)}")
    if not all(type(v) is int and 0 <= v < MAX_EXTENT for v in value):
        bad = next(v for v in value if not (type(v) is int and 0 <= v < MAX_EXTENT))
        raise rp.Refused(f"tensor {what} must hold ints in [0, 2**40), got {brief(bad)}")
    return value


def _strided_view(flat: np.ndarray, offset, size, stride) -> np.ndarray:
    """`torch.as_strided(storage, size, stride, offset)` as a read-only numpy view, bounds-checked."""
    if type(offset) is not int or not 0 <= offset < MAX_EXTENT:
        raise rp.Refused(f"tensor storage offset must be an int in [0, 2**40), got {brief(offset)}")
    size, stride = _extents(size, "size"), _extents(stride, "stride")
    if math.prod(n for n in size if n) >= MAX_EXTENT:  # numpy has no such shape, even empty
        raise rp.Refused(f"tensor size {list(size)} describes 2**40 elements or more")
    if len(size) != len(stride):
        raise rp.Refused(f"tensor size ({len(size)} dims) and stride ({len(stride)} dims) differ in length")
    if 0 in size:
        return np.empty(size, flat.dtype)
    # Checked before the view exists: as_strided itself would read any memory it is told to.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise rp.Refused(
            f"tensor (size {list(size)}, stride {list(stride)}, offset {offset}) reaches element {last} "
            f"of a storage of {flat.size} elements"
        )
    base = flat[offset:]
    return np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )


def _rebuild(func: rp.Global, args: tuple):
    """What REDUCE of an allowed torch function builds (`torch._utils` semantics)."""
    if func is rp.REBUILD_TENSOR:
        # requires_grad and backward hooks (always an empty OrderedDict from torch.save) do not
        # change the values; metadata (conj/neg bits of complex tensors) would, so it is refused.
        if len(args) not in (6, 7):
            raise rp.Refused(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
        storage, offset, size, stride, requires_grad, hooks, *metadata = args
        if not isinstance(storage, _Storage):
            raise rp.Refused(f"_rebuild_tensor_v2 expects a storage as its first argument, got {brief(storage)}")
        if type(requires_grad) is not bool or type(hooks) is not rp.StateDict or hooks:
            raise rp.Refused("_rebuild_tensor_v2 expects requires_grad (a bool) and an empty OrderedDict of hooks")
        if metadata and metadata[0] is not None and metadata[0] != {}:
            raise rp.Refused("_rebuild_tensor_v2 with tensor metadata (conj/neg bits) is not read")
        _check_grad(requires_grad, storage.array.dtype)
        return _Tensor(_strided_view(storage.array, offset, size, stride))
    if func is not rp.REBUILD_PARAMETER and func is not rp.REBUILD_PARAMETER_WITH_STATE:
        raise rp.Refused(f"REDUCE calls {func!r}, which is not a function")
    expected = 4 if func is rp.REBUILD_PARAMETER_WITH_STATE else 3
    if len(args) != expected:
        raise rp.Refused(f"{func.name} takes {expected} arguments, got {len(args)}")
    data, requires_grad, hooks, *state = args
    if not isinstance(data, _Tensor):
        raise rp.Refused(f"{func.name} expects a tensor as its first argument, got {brief(data)}")
    if type(requires_grad) is not bool or type(hooks) is not rp.StateDict or hooks:
        raise rp.Refused(f"{func.name} expects requires_grad (a bool) and an empty OrderedDict of hooks")
    if state and state[0] is not None and state[0] != {}:
        raise rp.Refused(f"{func.name} with parameter attributes is not read")
    _check_grad(requires_grad, data.array.dtype)
    return data


def _check_grad(requires_grad: bool, dtype: np.dtype) -> None:
    if requires_grad and not (dtype.kind == "f" or dtype == _STORAGE_DTYPES["BFloat16Storage"]):
        raise rp.Refused(f"a {dtype} tensor that requires grad (torch allows that for floating tensors only)")


class _Archive:
    """The records of one torch zip archive, located in a memory map and checked when read."""

    def __init__(self, path: str, buffer, entries: list[Entry]):
        self.path, self.buffer = path, buffer
        self.entries: dict[str, Entry] = {}
        for entry in entries:
            if entry.name in self.entries:
                raise CheckpointError(path, f"the zip archive holds two records named {cut(entry.name)}")
            if entry.method != 0 or entry.compressed_size != entry.size:
                raise CheckpointError(path, f"zip record {cut(entry.name)} is compressed: torch writes records "
                                            "uncompressed, and only those are read (re-save the file with torch.save)")
            if entry.flags & 0x61:  # encrypted, strongly encrypted, patch data: miniz refuses them too
                raise CheckpointError(path, f"zip record {cut(entry.name)} is encrypted or patch data")
            if entry.is_directory:  # torch writes none, and its reader reads none as a record
                raise CheckpointError(path, f"zip record {cut(entry.name)} is marked as a directory")
            self.entries[entry.name] = entry
        # As torch's reader: the folder of the first record holds the archive.
        if not entries or "/" not in entries[0].name:
            raise CheckpointError(path, "not a torch checkpoint: the first zip record is not in a folder")
        self.prefix = entries[0].name.split("/", 1)[0] + "/"
        outside = next((e.name for e in entries if not e.name.startswith(self.prefix)), None)
        if outside is not None:
            raise CheckpointError(path, f"not a torch checkpoint: record {cut(outside)} is outside the archive's folder {cut(self.prefix)}")
        if self.prefix + "data.pkl" not in self.entries:
            raise CheckpointError(path, f"not a torch checkpoint: a zip archive without {cut(self.prefix)}data.pkl")
        self._check_small_records()
        byteorder = b"little"
        if self.prefix + "byteorder" in self.entries:
            byteorder = bytes(self.record(self.prefix + "byteorder", limit=16))
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(path, "unknown byteorder record (neither 'little' nor 'big')")
        self.byteorder = "<" if byteorder == b"little" else ">"
        self.storages: dict[str, _Storage] = {}

    def _check_small_records(self) -> None:
        """The records torch reads besides the pickle and the storages, as torch checks them."""
        version_name = next((self.prefix + n for n in (".data/version", "version") if self.prefix + n in self.entries), None)
        if version_name is None:
            raise CheckpointError(self.path, "not a torch checkpoint: no version record")
        match = re.match(rb"\s*\+?([0-9]{1,20})", bytes(self.record(version_name, limit=64)))
        if match is None or not MIN_VERSION <= int(match[1]) <= MAX_VERSION:
            raise CheckpointError(self.path, f"unsupported torch file format version (torch reads {MIN_VERSION} to {MAX_VERSION})")
        if self.prefix + ".storage_alignment" in self.entries:
            try:
                int(bytes(self.record(self.prefix + ".storage_alignment", limit=64)))
            except ValueError:
                raise CheckpointError(self.path, "malformed .storage_alignment record (not an integer)") from None
        for name in (".format_version", ".data/serialization_id"):
            if self.prefix + name in self.entries:
                self.record(self.prefix + name, limit=4096)

    def record(self, name: str, limit: int | None = None) -> memoryview:
        """The bytes of a stored record, as a view of the mapped file (CRC-32 checked)."""
        entry = self.entries[name]
        shown = cut(name)
        if limit is not None and entry.size > limit:
            raise CheckpointError(self.path, f"zip record {shown} holds {entry.size:,} bytes, more than the {limit:,} it may")
        start = entry.local_offset
        signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(self.buffer, start)  # in the file: checked
        begin = start + _LOCAL_HEADER.size
        stored_name = bytes(self.buffer[begin : begin + name_length])
        if signature != ZIP_MAGIC or stored_name != entry.raw_name:
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (its local header does not match the directory)")
        begin += name_length + extra_length
        end = begin + entry.size
        if end > len(self.buffer):
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (it ends at byte {end:,} of {len(self.buffer):,})")
        data = self.buffer[begin:end]
        if crc32(data) != entry.crc:
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (CRC-32 mismatch)")
        return data

    def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        if key in self.storages:
            if self.storages[key].array.dtype != dtype or self.storages[key].array.size != numel:
                raise rp.Refused(f"storage {cut(key)} is referenced with two dtypes or sizes")
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        entry = self.entries.get(name)
        if entry is None:
            raise rp.Refused(f"storage record data/{cut(key)} is missing from the archive")
        if entry.size != numel * dtype.itemsize:
            raise rp.Refused(
                f"storage record data/{cut(key)} holds {entry.size} bytes, expected {brief(numel)} x {dtype.itemsize}"
            )
        raw = np.frombuffer(self.record(name), dtype=f"{self.byteorder}u{dtype.itemsize}")
        # Byte order is swapped on the unsigned view, which every dtype (bfloat16 too) has.
        storage = _Storage(raw.astype(f"=u{dtype.itemsize}", copy=False).view(dtype))
        self.storages[key] = storage
        return storage

    def persistent_load(self, pid) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise rp.Refused(f"unsupported persistent id ({brief(pid)}): only storage references are read")
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not rp.Global or storage_type not in _STORAGE_TYPES:
            raise rp.Refused(f"storage type must be one of torch.{', torch.'.join(_STORAGE_DTYPES)}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise rp.Refused("malformed storage reference: expected (str key, str location, int numel)")
        return self.storage(key, _STORAGE_TYPES[storage_type], numel)


def _map(path: str):
    """(a memoryview of the file mapped read-only, its zip directory entries)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        return buffer, read_directory(buffer)
    except ZipError as e:
        raise CheckpointError(path, f"corrupt or truncated zip archive ({e})") from None


def read_torch_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `torch.save(state_dict)` zip file without torch, at a cost bounded by its size.

    Args:
      path: a file written by `torch.save` with the (default since torch 1.6) zip format.

    Returns:
      The state dict in file order, name -> read-only numpy array with the saved dtype, shape
      and values (strides, offsets and shared storages honoured; device ignored). The arrays
      are views of the memory-mapped file (copies only for a big-endian file).

    Raises:
      CheckpointError: the file is not such an archive, is truncated or corrupt, has a
        compressed record, asks for an opcode or a global outside the allow-lists (refused
        before anything is called), exceeds a reading limit, or does not hold a flat dict of
        tensors.
    """
    path = os.fspath(path)
    buffer, infos = _map(path)
    archive = _Archive(path, buffer, infos)
    data = archive.record(archive.prefix + "data.pkl", limit=MAX_PICKLE)
    try:
        obj = rp.load(data, _GLOBALS, archive.persistent_load, _rebuild)
    except rp.Refused as e:
        raise CheckpointError(path, str(e)) from None
    if not isinstance(obj, dict):
        what = "a single tensor" if isinstance(obj, _Tensor) else brief(obj)
        raise CheckpointError(path, f"not a state dict: the file holds {what}, not a dict of tensors")
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, _Tensor):
            raise CheckpointError(path, f"not a state dict: {cut(key)} holds a value of type {type(value).__name__}, not a tensor")
        state[key] = value.array
    stored = sum(s.array.size for s in archive.storages.values())
    described = sum(math.prod(a.shape) for a in state.values())
    if described > MAX_VIEW_RATIO * stored + MIN_VIEW_ELEMENTS:
        raise CheckpointError(path, f"the tensors describe {described:,} elements from {stored:,} stored ones: views that "
                                    f"repeat stored elements more than {MAX_VIEW_RATIO} times over are refused")
    return state
