"""Forward logits `(B, T, V)` of one batch: the notebook model, the tuned torch model, jaxgpt.

jaxgpt's forward is `jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))` with the
parameters traced (as the engine and the training step do); the clock stops after
`block_until_ready`. The torch models run under `inference_mode` (the reference under
`no_grad`, as the notebook's code); the tuned one also at other thread counts and
`torch.compile`d when asked; the fastest tuned variant is the ratio's baseline.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import roofline
from benchmarks.harness import interleave, make_result, paired_ratio


def _torch_case(fn, tokens, ctx_factory, threads=None):
    from benchmarks.torch_tuned import torch_threads

    def case(warm: bool):
        with ctx_factory(), torch_threads(threads):
            begin = time.perf_counter()
            fn(tokens).cpu()  # device sync
            return {"seconds": time.perf_counter() - begin}

    return case


def _jax_case(model, tokens_np):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    tokens = jax.device_put(tokens_np)

    def case(warm: bool):
        begin = time.perf_counter()
        forward(state, tokens).block_until_ready()
        return {"seconds": time.perf_counter() - begin}

    return case


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """Times forward logits at each `suite.forward_shapes` (B, T).

    Returns:
      (result rows, ratios); a ratio is torch time / jaxgpt time.
    """
    import torch

    cfg = models.config
    compiled_forward = torch.compile(models.tuned, dynamic=False) if suite.compile_forward else None
    rows, ratios = [], {}
    rng = np.random.default_rng(0)
    for batch, length in suite.forward_shapes:
        tokens_np = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
        tokens = torch.from_numpy(tokens_np.astype(np.int64)).to(models.torch_device)
        cases = {
            "notebook model": _torch_case(models.reference, tokens, torch.no_grad),
            "torch tuned eager": _torch_case(models.tuned, tokens, torch.inference_mode),
            "jaxgpt": _jax_case(models.jax, tokens_np),
        }
        for n in suite.torch_threads:
            if n != torch.get_num_threads():
                cases[f"torch tuned eager, {n} thread{'s' if n > 1 else ''}"] = _torch_case(
                    models.tuned, tokens, torch.inference_mode, n)
        if compiled_forward is not None:
            cases["torch tuned compiled"] = _torch_case(compiled_forward, tokens, torch.inference_mode)
        measured = interleave(cases, suite.reps, suite.warmup, progress)
        flops = roofline.flops_forward(cfg, batch, length)
        for impl, m in measured.items():
            row = make_result(f"forward b{batch} t{length}", "jax" if impl == "jaxgpt" else "torch", impl,
                              batch, length, m)
            rows.append(roofline.annotate(row, flops, roofline.weight_bytes(cfg), limits))
        torch_impls = [k for k in measured if k != "jaxgpt"]
        best = min(torch_impls[1:], key=lambda k: np.median([r["seconds"] for r in measured[k].runs]))
        for slow, label in (("notebook model", "notebook"), (best, "tuned")):
            ratios[f"forward_b{batch}_t{length}_vs_{label}"] = {
                "what": f"forward logits ({batch}, {length}): jaxgpt vs {slow}",
                **paired_ratio(measured[slow].runs, measured["jaxgpt"].runs),
            }
    return rows, ratios
