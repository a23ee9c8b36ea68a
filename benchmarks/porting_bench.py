"""Porting time: `weights.pt` -> a ready model, jaxgpt vs torch.

jaxgpt: `porting.load_weights(path)` (torch-free reader, key mapping, shape checks, a GPT
with its parameters on the device; the clock stops once they are materialised). torch: what
a torch user does to get the same model: `torch.load(path)` + `load_state_dict(strict=True)`
into the notebook's class (construction included, as jaxgpt's includes building the GPT).
"""

from __future__ import annotations

import os
import time

from benchmarks.harness import interleave, make_result, paired_ratio


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """Times porting `models.weights_path`. Returns (rows, ratios); ratio = torch time / jaxgpt time."""
    import jax
    import torch
    from flax import nnx

    import porting
    from porting.torch_reference import reference_from_config

    path, cfg = models.weights_path, models.config

    def jax_case(warm: bool):
        begin = time.perf_counter()
        model = porting.load_weights(path)
        jax.block_until_ready(nnx.state(model))
        return {"seconds": time.perf_counter() - begin}

    def jax_first_case(warm: bool):  # the first load of a configuration in a process traces the module
        porting.load._abstract_model.cache_clear()
        return jax_case(warm)

    def torch_case(warm: bool):
        begin = time.perf_counter()
        model = reference_from_config(cfg)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return {"seconds": time.perf_counter() - begin}

    measured = interleave({"jaxgpt load_weights": jax_case, "jaxgpt load_weights, first in the process": jax_first_case,
                           "torch.load + load_state_dict": torch_case},
                          suite.porting_reps, suite.warmup, progress)
    size = os.path.getsize(path)
    rows = []
    for impl, m in measured.items():
        row = make_result("port weights.pt", "jax" if impl.startswith("jaxgpt") else "torch", impl, 1, 0, m,
                          params=cfg.num_params(), file_bytes=size)
        row["chars_per_s"] = None  # not a character throughput
        rows.append(row)
    ratios = {"porting_vs_torch_load": {
        "what": f"loading a {cfg.num_params():,}-parameter weights.pt into a ready model: jaxgpt vs torch",
        **paired_ratio(measured["torch.load + load_state_dict"].runs, measured["jaxgpt load_weights"].runs),
    }, "porting_first_load_vs_torch_load": {
        "what": "the same, the first load of its configuration in the process (the abstract module traced)",
        **paired_ratio(measured["torch.load + load_state_dict"].runs,
                       measured["jaxgpt load_weights, first in the process"].runs),
    }}
    return rows, ratios
