"""Shared by the attention and page tests: small models with random parameters, built fast."""

from __future__ import annotations

import numpy as np
from flax import nnx

import porting
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT


def random_model(config: GPTConfig, seed: int):
    """An eval-mode GPT of `config` with every parameter drawn by numpy from `seed`.

    No JAX random initialiser runs (each compiles its own program: ~1 s apiece on a busy
    2-core machine, 14 s for a two-block model). Kernels get N(0, 1/fan_in), LayerNorm scales
    1 + N(0, 0.1), everything else N(0, 0.1).
    """
    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        name, shape = ".".join(str(p) for p in path), variable.shape
        if name.endswith("scale"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2 and "embedding" not in name:
            value = rng.standard_normal(shape) / np.sqrt(shape[0])
        else:
            value = 0.1 * rng.standard_normal(shape)
        params[name] = value.astype(np.float32)
    return porting.model_from_params(params, config)
