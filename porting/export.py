"""Writing checkpoints: torch state dicts for the notebook, and Flax-native files.

Every writer is atomic (a temporary next to the destination, then `os.replace`/rename), so a
failure never leaves a partial file. Torch is imported only to write `.pt` files; it is an
optional extra (`pip install "jaxgpt[torch]"`).

Output formats (`FORMATS`):
  torch              `torch.save` of the notebook's state dict: torch key order, float32
  safetensors        Flax-native: keyed by Flax paths, config and variant in the metadata
  torch-safetensors  the notebook's key names in a safetensors file
  orbax              an orbax checkpoint directory (see orbax_io.py)
"""

from __future__ import annotations

import collections
import json
import os
import tempfile

import numpy as np

from jaxgpt.config import GPTConfig
from porting import keymap
from porting.atomic import atomic_file
from porting.errors import CheckpointError, TorchUnavailableError, summarize
from porting.load import Checkpoint, params_from_model, read_checkpoint, read_state_dict
from porting.orbax_io import write_orbax
from porting.safetensors_io import write_safetensors

FORMATS = ("torch", "safetensors", "torch-safetensors", "orbax")
FLAX_FORMAT_TAG = "jaxgpt.flax"
_CONFIG_FIELDS = ("vocab_size", "context_length", "model_dim", "num_blocks", "num_heads", "variant")


def _import_torch():
    try:
        import torch
    except ImportError:
        raise TorchUnavailableError() from None
    return torch


def flax_metadata(config: GPTConfig) -> dict[str, str]:
    """The metadata stored with Flax-native files (strings only, as safetensors requires)."""
    fields = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    return {"format": FLAX_FORMAT_TAG, "variant": config.variant, "config": json.dumps(fields, sort_keys=True)}


def state_dict_from_model(model) -> dict[str, np.ndarray]:
    """The notebook state dict of a `jaxgpt.GPT`: torch key -> float32 array, in torch's order."""
    return keymap.state_dict_from_params(params_from_model(model), model.config)


def write_params(path: str | os.PathLike, params: dict[str, np.ndarray], config: GPTConfig, fmt: str) -> None:
    """Writes Flax parameters (Flax path -> array) of `config` in one of `FORMATS`, atomically.

    Raises:
      CheckpointError: unknown format, or the destination cannot be written.
      TorchUnavailableError: `fmt` is "torch" and torch is not installed.
    """
    if fmt == "torch":
        torch = _import_torch()
        state = keymap.state_dict_from_params(params, config)
        tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items())
        with atomic_file(path) as tmp, tempfile.TemporaryDirectory(dir=os.path.dirname(tmp)) as holder:
            # torch.save names the archive's folder after the file's stem: saving under the
            # destination's own name (in a private directory) makes the bytes reproducible.
            named = os.path.join(holder, os.path.basename(os.fspath(path)))
            torch.save(tensors, named)
            os.replace(named, tmp)
    elif fmt == "safetensors":
        write_safetensors(path, params, flax_metadata(config))
    elif fmt == "torch-safetensors":
        write_safetensors(path, keymap.state_dict_from_params(params, config), {"format": "pt"})
    elif fmt == "orbax":
        write_orbax(path, params, flax_metadata(config))
    else:
        raise CheckpointError(path, f"unknown output format {fmt!r} (choose one of {', '.join(FORMATS)})")


def save_weights(model, path: str | os.PathLike) -> None:
    """Writes a `jaxgpt.GPT` as `torch.save(state_dict)` for the notebook's class.

    The keys are the model's variant's, in the order of the notebook model's `state_dict()`,
    float32, so `DrakeGPT/LearningGPT(...).load_state_dict(torch.load(path), strict=True)`
    works. The file appears only once complete.

    Args:
      model: a `jaxgpt.GPT`.
      path: destination `.pt` file (replaced if it exists).

    Raises:
      TorchUnavailableError: torch is not installed (`pip install "jaxgpt[torch]"`).
    """
    write_params(path, params_from_model(model), model.config, "torch")


def save_flax(model, path: str | os.PathLike, fmt: str = "safetensors") -> None:
    """Writes a `jaxgpt.GPT` in a Flax-native format ("safetensors" file or "orbax" directory)."""
    write_params(path, params_from_model(model), model.config, fmt)


def output_format(path: str | os.PathLike) -> str:
    """The output format a destination path implies: .pt/.pth/.bin torch, .safetensors Flax-native
    safetensors, a path ending in / or .orbax (or without suffix) an orbax directory."""
    path = os.fspath(path)
    if path.endswith(("/", os.sep)):
        return "orbax"
    suffix = os.path.splitext(path)[1].lower()
    by_suffix = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".safetensors": "safetensors", ".orbax": "orbax", "": "orbax"}
    if suffix not in by_suffix:
        raise CheckpointError(path, f"cannot tell the output format from suffix {suffix!r}: use .pt, .safetensors or a directory, or choose a format")
    return by_suffix[suffix]


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str | None = None) -> Checkpoint:
    """Converts a checkpoint between formats, exactly (float32 values are copied bit for bit).

    Args:
      src: any checkpoint `load_weights` reads.
      dst: destination; written atomically, never left partial.
      fmt: one of `FORMATS`; None picks it from `dst` (see `output_format`).

    Returns:
      The `Checkpoint` read from `src` (config, parameter count, ...).
    """
    fmt = fmt or output_format(dst)
    checkpoint = read_checkpoint(src)
    dst = os.fspath(dst).rstrip("/" + os.sep) or os.fspath(dst)
    write_params(dst, checkpoint.params, checkpoint.config, fmt)
    return checkpoint


def verify(source: Checkpoint, dst: str | os.PathLike) -> Checkpoint:
    """Re-reads a converted checkpoint and checks it against the one it was converted from.

    Every tensor must be identical bit for bit after the layout mapping (both sides as Flax
    float32 parameters), the stored keys must be exactly those of the output's key naming
    (`keymap.layout`), and the configuration read back must be the source's.

    Args:
      source: the `Checkpoint` that `convert` returned (the input as read).
      dst: the written file or directory.

    Returns:
      The `Checkpoint` read back from `dst`.

    Raises:
      CheckpointError: naming `dst` and every difference found.
    """
    out = read_checkpoint(dst)
    problems = []
    fields = ("variant", "vocab_size", "context_length", "model_dim", "num_blocks", "num_heads")
    differ = [f"{f} {getattr(out.config, f)!r} (input {getattr(source.config, f)!r})"
              for f in fields if getattr(out.config, f) != getattr(source.config, f)]
    if differ:
        problems.append("config differs: " + ", ".join(differ))
    stored = set(read_state_dict(out.path))
    expected = set(keymap.layout(out.config, out.scheme))
    if stored != expected:
        problems.append(f"stored keys differ from the {out.scheme} layout: "
                        f"{len(expected - stored)} missing, {len(stored - expected)} unexpected")
    missing = sorted(set(source.params) - set(out.params), key=keymap.natural_key)
    extra = sorted(set(out.params) - set(source.params), key=keymap.natural_key)
    if missing or extra:
        problems.append(f"parameters differ: missing {summarize(missing)}; unexpected {summarize(extra)}")
    changed = []
    for key, want in source.params.items():
        got = out.params.get(key)
        if got is None:
            continue
        if got.dtype != np.float32 or got.shape != want.shape or not np.array_equal(
                np.ascontiguousarray(got).view(np.uint32), np.ascontiguousarray(want, dtype=np.float32).view(np.uint32)):
            changed.append(key)
    if changed:
        problems.append(f"{len(changed)} tensors differ in their bits: {summarize(sorted(changed, key=keymap.natural_key))}")
    if problems:
        raise CheckpointError(dst, "verification failed: " + "; ".join(problems))
    return out

