"""Reading checkpoints of any supported format into a jaxgpt model, without torch.

Formats are told apart by content, not by file name:
  torch zip      `torch.save(model.state_dict())` (starts with a zip header)   -> torch_zip.py
  safetensors    torch key names or Flax paths (8-byte length + JSON header)   -> safetensors_io.py
  orbax          a directory written by `porting.export` / `jaxgpt convert`    -> orbax_io.py
The variant and the whole configuration come from the key names and shapes (keymap.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter

import numpy as np

from jaxgpt.config import GPTConfig
from porting import keymap
from porting.errors import CheckpointError, brief
from porting.orbax_io import is_orbax_checkpoint, read_orbax
from porting.safetensors_io import looks_like_safetensors, read_safetensors
from porting.torch_zip import EMPTY_ZIP_MAGIC, LEGACY_MAGIC, ZIP_MAGIC, read_torch_zip

TORCH_FORMAT, SAFETENSORS_FORMAT, ORBAX_FORMAT = "torch", "safetensors", "orbax"
_STORED_FIELDS = ("vocab_size", "context_length", "model_dim", "num_blocks", "num_heads", "variant")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint, converted to jaxgpt's Flax layout.

    Attributes:
      path: the file or directory read.
      format: "torch" (zip pickle), "safetensors" or "orbax".
      scheme: the key names found, "torch" (the notebook's) or "flax" (jaxgpt's paths).
      config: the configuration inferred from the keys and shapes.
      params: Flax path (e.g. "blocks.0.attention.qkv") -> float32 numpy array.
      dtypes: dtype name -> number of tensors stored with it, as found in the file.
      num_tensors: tensors in the file.
      file_size: bytes on disk (all files, for a directory).
    """

    path: str
    format: str
    scheme: str
    config: GPTConfig
    params: dict[str, np.ndarray]
    dtypes: dict[str, int]
    num_tensors: int
    file_size: int

    @property
    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))


def _file_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def _sniff(path: str) -> str:
    """The format of `path` from its first bytes, or a CheckpointError saying what it is instead."""
    if not os.path.lexists(path):
        raise CheckpointError(path, "no such file")
    if os.path.isdir(path):
        if is_orbax_checkpoint(path):
            return ORBAX_FORMAT
        raise CheckpointError(path, "is a directory, not a checkpoint file (nor a jaxgpt orbax checkpoint directory)")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(path, "empty file (0 bytes), not a checkpoint")
    if head.startswith(ZIP_MAGIC):
        return TORCH_FORMAT
    if head.startswith(EMPTY_ZIP_MAGIC):
        raise CheckpointError(path, "an empty zip archive, not a torch checkpoint")
    if looks_like_safetensors(head):
        return SAFETENSORS_FORMAT
    if head.startswith(LEGACY_MAGIC):
        raise CheckpointError(
            path,
            "legacy torch format (written by torch < 1.6 or with _use_new_zipfile_serialization=False), which "
            "is not read without torch; re-save it with torch: "
            "torch.save(torch.load(PATH, weights_only=True), NEW_PATH)",
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(path, "a bare pickle, not a torch zip checkpoint: only torch.save(model.state_dict()) files are read")
    raise CheckpointError(path, f"not a checkpoint: unrecognised content starting with {head[:8]!r}")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint under its stored name, without torch.

    Args:
      path: a torch zip `.pt`, a `.safetensors` file or a jaxgpt orbax directory.

    Returns:
      name -> numpy array with the stored dtype, in file order (torch key names for torch
      files and torch-keyed safetensors, Flax paths for jaxgpt's own files).

    Raises:
      CheckpointError: missing path, directory, empty/truncated/corrupt file, refused pickle.
    """
    return _read(os.fspath(path))[1]


def _read(path: str) -> tuple[str, dict[str, np.ndarray], dict]:
    fmt = _sniff(path)
    if fmt == TORCH_FORMAT:
        return fmt, read_torch_zip(path), {}
    if fmt == SAFETENSORS_FORMAT:
        tensors, metadata = read_safetensors(path)
        return fmt, tensors, metadata
    tensors, metadata = read_orbax(path)
    return fmt, tensors, metadata


def _check_metadata(path: str, metadata: dict, config: GPTConfig) -> None:
    """Flax-native files state their configuration: it must agree with what the shapes say."""
    declared = [("variant", metadata["variant"])] if "variant" in metadata else []
    if "config" in metadata:
        try:
            fields = json.loads(metadata["config"]) if isinstance(metadata["config"], str) else metadata["config"]
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            fields = None
        if not isinstance(fields, dict):
            raise CheckpointError(path, "malformed config in the file's metadata")
        declared += list(fields.items())
    wrong = {f"{name}={brief(value)} (the tensors say {getattr(config, name)!r})"
             for name, value in declared if name in _STORED_FIELDS and value != getattr(config, name)}
    if wrong:
        raise CheckpointError(path, f"the metadata disagrees with the tensors: {', '.join(sorted(wrong))}")


def read_checkpoint(path: str | os.PathLike, *, dropout: float = 0.2) -> Checkpoint:
    """Reads and checks a checkpoint; infers variant and configuration; converts to Flax layout.

    Args:
      path: a torch zip `.pt` (`torch.save(model.state_dict())`), a `.safetensors` file (torch
        key names or Flax paths) or a jaxgpt orbax checkpoint directory.
      dropout: dropout rate of the returned configuration (checkpoints do not store it).

    Returns:
      A `Checkpoint`.

    Raises:
      CheckpointError: naming the file and every problem found (see `keymap.check_layout`).
    """
    path = os.fspath(path)
    fmt, state, metadata = _read(path)
    scheme, variant = keymap.detect_naming(state, source=path)
    config = keymap.infer_config(state, scheme, variant, source=path, dropout=dropout)
    _check_metadata(path, metadata, config)
    keymap.check_layout(state, config, scheme, source=path)
    if scheme == keymap.TORCH:
        params = keymap.params_from_state_dict(state, config)
    else:
        params = dict(zip(state, keymap.aligned_copies(state.values())))
    return Checkpoint(
        path=path, format=fmt, scheme=scheme, config=config, params=params,
        dtypes=dict(Counter(str(v.dtype) for v in state.values())), num_tensors=len(state), file_size=_file_size(path),
    )


@functools.lru_cache(maxsize=8)
def _abstract_model(config: GPTConfig):
    """(graphdef, [(path, name, abstract variable)]) of a GPT of `config` (eval mode).

    Built from `jaxgpt.model.ShapeOnly` parameters: nothing is initialised or traced. Kept per
    configuration, as the result is immutable.
    """
    from flax import nnx

    from jaxgpt.model import GPT, ShapeOnly

    graphdef, state = nnx.split(GPT(config, rngs=ShapeOnly()))
    leaves = [(path, ".".join(str(p) for p in path), variable) for path, variable in nnx.to_flat_state(state)]
    return graphdef, leaves


def model_from_params(params: dict[str, np.ndarray], config: GPTConfig):
    """A `jaxgpt.GPT` in eval mode holding a copy of `params` (Flax path -> array of the right shape).

    The model never shares memory with `params` (XLA:CPU would adopt an aligned float32
    array as its buffer, so a later write to it would change the model).
    """
    return _model(params, config, copy=True)


def _model(params: dict[str, np.ndarray], config: GPTConfig, *, copy: bool):
    """`model_from_params`; with `copy=False`, `params` must be arrays that no one else holds
    or writes (the reader's own, from `keymap.aligned_arrays`): XLA:CPU adopts them as they are.

    The module's structure is built without values (see `_abstract_model`) and the
    parameters are put on the device in one transfer.
    """
    import jax
    from flax import nnx

    graphdef, leaves = _abstract_model(config)
    values = []
    for _, name, variable in leaves:
        value = params[name]
        if tuple(value.shape) != tuple(variable.shape):  # guards the keymap against model changes
            raise ValueError(f"parameter {name}: expected shape {variable.shape}, got {value.shape}")
        values.append(value)
    values = keymap.aligned_copies(values) if copy else [np.asarray(v, dtype=np.float32) for v in values]
    arrays = jax.device_put(values)
    state = nnx.from_flat_state([(path, variable.replace(array)) for (path, _, variable), array in zip(leaves, arrays)])
    return nnx.merge(graphdef, state)


def params_from_model(model) -> dict[str, np.ndarray]:
    """A `jaxgpt.GPT`'s parameters as Flax path -> float32 numpy array."""
    from flax import nnx

    return {
        ".".join(str(p) for p in path): np.asarray(variable[...], dtype=np.float32)
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def load_weights(path: str | os.PathLike, *, dropout: float = 0.2):
    """Loads a checkpoint as a `jaxgpt.GPT` in eval mode, without importing torch.

    Args:
      path: `torch.save(model.state_dict())` zip file of either notebook variant (any
        configuration), a `.safetensors` file with the same keys or Flax paths, or a jaxgpt
        orbax checkpoint directory.
      dropout: dropout rate used if the model is later put in training mode.

    Returns:
      `jaxgpt.GPT` with the inferred `GPTConfig`, in eval mode.

    Raises:
      CheckpointError: the file is missing, not a checkpoint, truncated, refused (hostile
        pickle), has missing/unexpected keys, wrong shapes, an unknown variant or non-finite
        values; the message names the file and every problem.
    """
    checkpoint = read_checkpoint(path, dropout=dropout)
    return _model(checkpoint.params, checkpoint.config, copy=False)  # the reader's own new arrays
