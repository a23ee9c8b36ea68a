"""Orbax checkpoint directories of jaxgpt parameters.

Layout (an orbax composite checkpoint):
  <dir>/params/   the parameters as a nested dict of float32 arrays, keyed by the parts of the
                  Flax paths ({"blocks": {"0": {"attention": {"qkv": ...}}}, ...})
  <dir>/jaxgpt/   JSON metadata: {"format": "jaxgpt.flax", "variant": ..., "config": {...}}
The directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os

import numpy as np

from porting.atomic import atomic_directory
from porting.errors import CheckpointError

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


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if not isinstance(tree, dict):
        return {prefix: np.asarray(tree)}
    flat: dict[str, np.ndarray] = {}
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


def read_orbax(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a directory written by `write_orbax`.

    Returns:
      (params, metadata): Flax path -> numpy array, and the JSON metadata.

    Raises:
      CheckpointError: not such a directory, or orbax cannot restore it.
    """
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    if not is_orbax_checkpoint(path):
        raise CheckpointError(path, f"not a jaxgpt orbax checkpoint directory (needs {PARAMS_ITEM}/ and {METADATA_ITEM}/)")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                os.path.abspath(path),
                ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(), METADATA_ITEM: ocp.args.JsonRestore()}),
            )
        params, metadata = restored[PARAMS_ITEM], restored[METADATA_ITEM]
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
        raise CheckpointError(path, f"corrupt orbax checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "corrupt orbax checkpoint: metadata is not a JSON object")
    return {k: np.asarray(v) for k, v in _flatten(params).items()}, metadata
