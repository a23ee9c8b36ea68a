"""A restricted reader of `torch.save(state_dict)` files (zip format) that never imports torch.

A torch checkpoint is a zip archive `<name>/data.pkl` + `<name>/data/<key>` + `<name>/byteorder`
(+ version records). `data.pkl` is a pickle: running it with the standard `pickle.load` would
let the file call any importable function, so this module unpickles it with an allow-list:

* `find_class` answers only the handful of globals that `torch.save` writes for a dict of
  tensors, and answers them with harmless stand-ins defined here (never torch's objects);
  any other global is refused before anything from the file is called.
* `persistent_load` turns each storage reference `('storage', <FloatStorage & co>, key,
  location, numel)` into a read-only numpy array of the raw record `data/<key>`; the location
  (`'cpu'`, `'cuda:0'`, ...) is ignored, so tensors saved from a GPU load on the CPU.
* `_rebuild_tensor_v2(storage, offset, size, stride, ...)` becomes a strided numpy view of
  that storage, bounds-checked before it is made, so views, transposes, slices with offsets
  and storages shared by several tensors come back exactly as `torch.load` gives them.
* the only objects a `BUILD` opcode can reach are the stand-ins, whose `__setstate__`
  accepts nothing but a state dict's `_metadata` (so a file cannot alter them for later loads).

Supported storage dtypes: float32, float16, bfloat16 (via `ml_dtypes`), float64 and the
integer/bool types. The older non-zip ("legacy") format is recognised and refused with a
message that says how to re-save the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
import zlib

import ml_dtypes
import numpy as np

from porting.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
# torch's legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2).
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

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


class _Refused(pickle.UnpicklingError):
    """Raised inside the unpickler; turned into a CheckpointError naming the file."""


class _StorageType:
    """Stands for `torch.FloatStorage` & co. in a pickle: it only names a dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __setstate__(self, state):
        raise _Refused(f"unexpected state for {self.name}")


class _Tensor:
    """A rebuilt tensor: holds its numpy array until the state dict is handed out."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise _Refused("unexpected state for a tensor")


class _StateDict(collections.OrderedDict):
    """Stands for `collections.OrderedDict`; `BUILD` may only attach torch's `_metadata`."""

    def __setstate__(self, state):
        # torch.save(model.state_dict()) pickles the dict's `_metadata` attribute (per-module
        # version numbers). It carries no weights, so it is checked and dropped.
        if not isinstance(state, dict) or not set(state) <= {"_metadata"}:
            raise _Refused("unexpected state for an OrderedDict")


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise _Refused(f"tensor {what} must be a tuple of non-negative ints, got {value!r:.80}")
    return value


def _strided_view(flat: np.ndarray, offset, size, stride) -> np.ndarray:
    """`torch.as_strided(storage, size, stride, offset)` as a read-only numpy view, bounds-checked."""
    if type(offset) is not int or offset < 0:
        raise _Refused(f"tensor storage offset must be a non-negative int, got {offset!r:.80}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"tensor size {size} and stride {stride} differ in length")
    if 0 in size:
        return np.empty(size, flat.dtype)
    # Checked before the view exists: as_strided itself would read any memory it is told to.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise _Refused(
            f"tensor (size {list(size)}, stride {list(stride)}, offset {offset}) reaches element {last} "
            f"of a storage of {flat.size} elements"
        )
    base = flat[offset:]
    return np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )


class _Storage:
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise _Refused("unexpected state for a storage")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # requires_grad, backward hooks (always an empty OrderedDict from torch.save) and metadata
    # (conj/neg bits of complex tensors) do not change the stored values.
    if not isinstance(storage, _Storage):
        raise _Refused("_rebuild_tensor_v2 expects a storage as its first argument")
    return _Tensor(_strided_view(storage.array, storage_offset, size, stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _Tensor):
        raise _Refused("_rebuild_parameter expects a tensor as its first argument")
    return data


class _Function:
    """An allowed callable. A bare function would not do: `BUILD` could then rewrite its
    `__dict__` or `__defaults__` and so change later loads in this process."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args):
        return self._fn(*args)

    def __setstate__(self, state):
        raise _Refused("unexpected state for a function")


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load_storage):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            hint = ""
            if module not in ("torch", "torch._utils", "collections"):
                hint = " (a pickled object other than a state dict; save model.state_dict() instead)"
            raise _Refused(
                f"refused to load global {module}.{name}: only the torch tensor/state-dict globals are "
                f"allowed{hint}; nothing from the file was run"
            ) from None

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"storage type must be one of torch.{', torch.'.join(_STORAGE_DTYPES)}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise _Refused(f"malformed storage reference {pid!r:.80}")
        return self._load_storage(key, storage_type.dtype, numel)


class _Archive:
    """The records of one torch zip archive, read and checked lazily."""

    def __init__(self, path: str, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            problem = "no <name>/data.pkl record" if not pickles else f"{len(pickles)} data.pkl records"
            raise CheckpointError(path, f"not a torch checkpoint: a zip archive with {problem}")
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = self.read(self.prefix + "byteorder") if self.prefix + "byteorder" in zf.NameToInfo else b"little"
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(path, f"unknown byteorder record {byteorder[:20]!r}")
        self.byteorder = "<" if byteorder == b"little" else ">"
        self.storages: dict[str, _Storage] = {}

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(name)  # checks the record's CRC-32
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError, ValueError) as e:
            raise CheckpointError(self.path, f"corrupt or truncated zip record {name} ({e})") from None

    def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        if key in self.storages:
            if self.storages[key].array.dtype != dtype:
                raise _Refused(f"storage {key} is referenced with two dtypes")
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        info = self.zf.NameToInfo.get(name)
        if info is None:
            raise _Refused(f"storage record data/{key} is missing from the archive")
        if info.file_size != numel * dtype.itemsize:
            raise _Refused(
                f"storage record data/{key} holds {info.file_size} bytes, expected {numel} x {dtype.itemsize}"
            )
        raw = np.frombuffer(self.read(name), dtype=f"{self.byteorder}u{dtype.itemsize}")
        # Byte order is swapped on the unsigned view, which every dtype (bfloat16 too) has.
        storage = _Storage(raw.astype(f"=u{dtype.itemsize}", copy=False).view(dtype))
        self.storages[key] = storage
        return storage


def read_torch_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `torch.save(state_dict)` zip file without torch.

    Args:
      path: a file written by `torch.save` with the (default since torch 1.6) zip format.

    Returns:
      The state dict in file order, name -> read-only numpy array with the saved dtype, shape
      and values (strides, offsets and shared storages honoured; device ignored).

    Raises:
      CheckpointError: the file is not such an archive, is truncated or corrupt, asks for a
        global outside the allow-list (refused before anything is called), or does not hold
        a flat dict of tensors.
    """
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise CheckpointError(path, f"corrupt or truncated zip archive ({e})") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    with zf:
        archive = _Archive(path, zf)
        data = archive.read(archive.prefix + "data.pkl")
        try:
            obj = _RestrictedUnpickler(data, archive.storage).load()
        except CheckpointError:
            raise
        except _Refused as e:
            raise CheckpointError(path, str(e)) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError, UnicodeDecodeError, MemoryError, RecursionError) as e:
            raise CheckpointError(path, f"corrupt data.pkl record ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        what = "a single tensor" if isinstance(obj, _Tensor) else f"a value of type {type(obj).__name__}"
        raise CheckpointError(path, f"not a state dict: the file holds {what}, not a dict of tensors")
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(path, f"not a state dict: key {key!r:.40} is not a string")
        if not isinstance(value, _Tensor):
            raise CheckpointError(path, f"not a state dict: {key} holds a value of type {type(value).__name__}, not a tensor")
        state[key] = value.array
    return state
