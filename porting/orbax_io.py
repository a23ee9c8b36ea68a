"""Orbax checkpoint directories of jaxgpt parameters.

Layout (an orbax composite checkpoint):
  <dir>/params/   the parameters as a nested dict of float32 arrays, keyed by the parts of the
                  Flax paths ({"blocks": {"0": {"attention": {"qkv": ...}}}, ...})
  <dir>/jaxgpt/   JSON metadata: {"format": "jaxgpt.flax", "variant": ..., "config": {...}}
The directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os

import numpy as np

from porting.atomic import atomic_directory
from porting.errors import CheckpointError, cut

METADATA_ITEM = "jaxgpt"
PARAMS_ITEM = "params"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory laid out as `write_orbax` writes it."""
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, METADATA_ITEM)) and os.path.isdir(os.path.join(path, PARAMS_ITEM))


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(value, dtype=np.float32)
    return tree


def _flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def write_orbax(path: str | os.PathLike, params: dict[str, np.ndarray], metadata: dict) -> None:
    """Writes `params` (Flax path -> array) and JSON `metadata` as an orbax checkpoint directory.

    Raises:
      CheckpointError: `path` already exists or its parent directory does not.
    """
    import orbax.checkpoint as ocp

    with atomic_directory(path) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(
                os.path.abspath(tmp),
                ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(_nest(params)),
                                      METADATA_ITEM: ocp.args.JsonSave(metadata)}),
            )


MAX_METADATA = 1 << 20  # bytes of the jaxgpt JSON metadata
MAX_EXPANSION = 16  # array bytes declared / bytes on disk, beyond MIN_DECLARED
MIN_DECLARED = 64 << 20


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs warnings through absl for ordinary reads; a reader must not print."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_metadata(path: str) -> dict:
    name = os.path.join(path, METADATA_ITEM, "metadata")
    try:
        if os.path.getsize(name) > MAX_METADATA:
            raise CheckpointError(path, f"corrupt orbax checkpoint: {METADATA_ITEM}/metadata is larger than {MAX_METADATA:,} bytes")
        with open(name, "rb") as f:
            metadata = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(path, f"corrupt orbax checkpoint: cannot read {METADATA_ITEM}/metadata ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(path, f"corrupt orbax checkpoint: {METADATA_ITEM}/metadata is not JSON ({type(e).__name__})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "corrupt orbax checkpoint: metadata is not a JSON object")
    return metadata


def _declared_bytes(path: str, tree) -> int:
    """Bytes the arrays of a params metadata tree declare (shapes as tensorstore reads them)."""
    total = 0
    for name, leaf in _flatten(tree).items():
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape) and dtype is not None):
            raise CheckpointError(path, f"corrupt orbax checkpoint: {cut(name)} is not an array")
        total += math.prod(shape) * np.dtype(dtype).itemsize
    return total


def read_orbax(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a directory written by `write_orbax`, at a memory cost bounded by its size.

    The arrays' shapes are read first (orbax's metadata, no data): together they may declare
    at most `MAX_EXPANSION` times the directory's bytes (plus `MIN_DECLARED`), since the
    chunks are compressed and a few bytes could otherwise claim gigabytes of zeros.

    Returns:
      (params, metadata): Flax path -> numpy array, and the JSON metadata.

    Raises:
      CheckpointError: not such a directory, its arrays declare more than the bound, or
        orbax cannot restore it.
    """
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    if not is_orbax_checkpoint(path):
        raise CheckpointError(path, f"not a jaxgpt orbax checkpoint directory (needs {PARAMS_ITEM}/ and {METADATA_ITEM}/)")
    metadata = _read_metadata(path)
    params_dir = os.path.join(os.path.abspath(path), PARAMS_ITEM)
    on_disk = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    try:
        with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
            declared = _declared_bytes(path, checkpointer.metadata(params_dir).item_metadata.tree)
            if declared > MAX_EXPANSION * on_disk + MIN_DECLARED:
                raise CheckpointError(path, f"corrupt orbax checkpoint: its arrays declare {declared:,} bytes from "
                                            f"{on_disk:,} on disk (more than {MAX_EXPANSION} times over)")
            params = checkpointer.restore(params_dir)
    except (CheckpointError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types for a damaged directory)
        raise CheckpointError(path, f"corrupt orbax checkpoint ({type(e).__name__}: {cut(str(e), 200)})") from None
    if not isinstance(params, dict):
        raise CheckpointError(path, "corrupt orbax checkpoint: the params item is not a tree of arrays")
    return {k: np.asarray(v) for k, v in _flatten(params).items()}, metadata
