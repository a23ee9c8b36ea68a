"""A restricted, bounded reader of `torch.save(state_dict)` files (zip format) that never imports torch.

A torch checkpoint is a zip archive `<name>/data.pkl` + `<name>/data/<key>` + `<name>/byteorder`
(+ version records). Reading one costs about what its size says, whatever its bytes:

* the zip's central directory is parsed by `zipfile`; records are not read through it but
  located in a memory map of the file (local header checked against the central one, CRC-32
  checked), so storages are read-only views of the mapped file, never copies;
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
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np

from porting import restricted_pickle as rp
from porting.errors import CheckpointError, brief, cut

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
# torch's legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2).
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

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
        return _Tensor(_strided_view(storage.array, offset, size, stride))
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
    return data


class _Archive:
    """The records of one torch zip archive, located in a memory map and checked when read."""

    def __init__(self, path: str, buffer, infos: list[zipfile.ZipInfo]):
        self.path, self.buffer = path, buffer
        self.infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.infos:
                raise CheckpointError(path, f"the zip archive holds two records named {cut(info.filename)}")
            self.infos[info.filename] = info
        pickles = [n for n in self.infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            problem = "no <name>/data.pkl record" if not pickles else f"{len(pickles)} data.pkl records"
            raise CheckpointError(path, f"not a torch checkpoint: a zip archive with {problem}")
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = b"little"
        if self.prefix + "byteorder" in self.infos:
            byteorder = bytes(self.record(self.prefix + "byteorder", limit=16))
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(path, "unknown byteorder record (neither 'little' nor 'big')")
        self.byteorder = "<" if byteorder == b"little" else ">"
        self.storages: dict[str, _Storage] = {}

    def record(self, name: str, limit: int | None = None) -> memoryview:
        """The bytes of a stored record, as a view of the mapped file (CRC-32 checked)."""
        info = self.infos[name]
        shown = cut(name)
        if info.flag_bits & 0x1:
            raise CheckpointError(self.path, f"zip record {shown} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(self.path, f"zip record {shown} is compressed: torch writes records uncompressed, "
                                             "and only those are read (re-save the file with torch.save)")
        if limit is not None and info.file_size > limit:
            raise CheckpointError(self.path, f"zip record {shown} holds {info.file_size:,} bytes, more than the {limit:,} it may")
        start = info.header_offset
        if start < 0 or start + _LOCAL_HEADER.size > len(self.buffer):
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (its header is outside the file)")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(self.buffer, start)
        begin = start + _LOCAL_HEADER.size
        stored_name = bytes(self.buffer[begin : begin + name_length])
        if signature != ZIP_MAGIC or stored_name != _raw_name(info):
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (its local header does not match the directory)")
        begin += name_length + extra_length
        end = begin + info.file_size
        if end > len(self.buffer):
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (it ends at byte {end:,} of {len(self.buffer):,})")
        data = self.buffer[begin:end]
        if zlib.crc32(data) != info.CRC:
            raise CheckpointError(self.path, f"corrupt or truncated zip record {shown} (CRC-32 mismatch)")
        return data

    def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        if key in self.storages:
            if self.storages[key].array.dtype != dtype or self.storages[key].array.size != numel:
                raise rp.Refused(f"storage {cut(key)} is referenced with two dtypes or sizes")
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        info = self.infos.get(name)
        if info is None:
            raise rp.Refused(f"storage record data/{cut(key)} is missing from the archive")
        if info.file_size != numel * dtype.itemsize:
            raise rp.Refused(
                f"storage record data/{cut(key)} holds {info.file_size} bytes, expected {brief(numel)} x {dtype.itemsize}"
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
        if storage_type not in _STORAGE_TYPES:
            raise rp.Refused(f"storage type must be one of torch.{', torch.'.join(_STORAGE_DTYPES)}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise rp.Refused("malformed storage reference: expected (str key, str location, int numel)")
        return self.storage(key, _STORAGE_TYPES[storage_type], numel)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The name as its bytes appear in the archive (what zipfile decoded from them)."""
    try:
        return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    except UnicodeEncodeError:
        return b""  # never equal to a header's bytes: reported as a mismatch


def _map(path: str):
    """(a memoryview of the file mapped read-only, the zip's entries)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        # The central directory is parsed by zipfile, which raises many types for damaged bytes
        # (BadZipFile, NotImplementedError for a "version needed", UnicodeDecodeError for a
        # name, struct.error, ...): every one of them means a damaged archive. Its memory is
        # a small multiple of the directory's size; records are never read through it.
        with zipfile.ZipFile(_MappedFile(buffer)) as zf:
            infos = zf.infolist()
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (see above)
        raise CheckpointError(path, f"corrupt or truncated zip archive ({type(e).__name__}: {cut(str(e), 120)})") from None
    return buffer, infos


class _MappedFile:
    """A read-only, seekable file over a buffer: what zipfile needs, without copying the file."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, len(self.buffer))[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the file")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.buffer) if n is None or n < 0 else min(len(self.buffer), self.pos + n)
        data = bytes(self.buffer[self.pos : end]) if end > self.pos else b""
        self.pos = max(self.pos, end)
        return data

    def seekable(self) -> bool:
        return True


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
