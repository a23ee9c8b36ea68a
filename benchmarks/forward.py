"""Forward logits `(B, T, V)` of one batch: notebook model, tuned torch, ONNX Runtime, jaxgpt.

jaxgpt's forward is `jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))` with the
parameters traced (as the engine and the training step do), compiled with the options jaxgpt's
own batch programs take for B x T tokens (`jaxgpt.train.step_compiler_options`, as the
evaluation loss: on the CPU, Eigen's matrix products from 4,096 rows on); the clock stops after
`block_until_ready`. The torch models run under `inference_mode` (the reference under
`no_grad`, as the notebook's code) at the thread count a probe finds fastest
(`benchmarks.threads`); the tuned one at torch's default and at each candidate thread count,
and `torch.compile`d when asked; the fastest tuned variant (by median) is the ratio's baseline.
With the `[onnx]` extra the exported notebook model runs on ONNX Runtime at each session
thread count too (`benchmarks.onnx_runtime`), its fastest variant the baseline of a third ratio.

Each case times one call. The harness first lets the previous case's threads go idle, then runs
the case untimed for `suite.lead_in_s` (`benchmarks.harness.interleave`), so the timed call finds
the cores busy, as in a loop of calls, not cold after a pause.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import roofline
from benchmarks.harness import interleave, make_result, paired_ratio


def _torch_case(fn, tokens, ctx_factory, threads=None):
    from benchmarks.threads import torch_threads

    def case(warm: bool):
        with ctx_factory(), torch_threads(threads):
            begin = time.perf_counter()
            fn(tokens).cpu()  # device sync
            return {"seconds": time.perf_counter() - begin}

    return case


def _ort_case(ort_model, tokens_np, threads):
    tokens = tokens_np.astype(np.int64)

    def case(warm: bool):
        begin = time.perf_counter()
        ort_model.logits(tokens, threads)  # returns numpy: synchronous
        return {"seconds": time.perf_counter() - begin}

    return case


def _jax_case(model, tokens_np):
    import jax
    from flax import nnx

    from jaxgpt.train import step_compiler_options

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), compiler_options=step_compiler_options(
        tokens=int(np.prod(tokens_np.shape))))
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

    from benchmarks.threads import probe_threads

    cfg = models.config
    compiled_forward = torch.compile(models.tuned, dynamic=False) if suite.compile_forward else None
    rows, ratios = [], {}
    rng = np.random.default_rng(0)
    plural = lambda n: f"{n} thread{'s' if n > 1 else ''}"
    for batch, length in suite.forward_shapes:
        tokens_np = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
        tokens = torch.from_numpy(tokens_np.astype(np.int64)).to(models.torch_device)
        # The notebook model at the thread count a probe picks; the tuned model (the baseline of
        # the ratio) at every count, measured like jaxgpt, the fastest median counting.
        nb_threads, nb_probe = probe_threads({"forward": (1, lambda: models.reference(tokens).cpu())},
                                             suite.torch_threads)
        nb_name = f"notebook model, {plural(nb_threads)}"
        cases = {nb_name: _torch_case(models.reference, tokens, torch.no_grad, nb_threads),
                 "jaxgpt": _jax_case(models.jax, tokens_np)}
        for n in dict.fromkeys([torch.get_num_threads(), *suite.torch_threads]):
            cases[f"torch tuned eager, {plural(n)}"] = _torch_case(models.tuned, tokens, torch.inference_mode, n)
        if compiled_forward is not None:
            cases[f"torch tuned compiled, {plural(torch.get_num_threads())}"] = _torch_case(
                compiled_forward, tokens, torch.inference_mode)
        if models.ort is not None:  # every session thread count, the fastest median counting
            for n in models.ort.threads:
                cases[f"onnxruntime, {plural(n)}"] = _ort_case(models.ort, tokens_np, n)
        probes = {nb_name: nb_probe}
        measured = interleave(cases, suite.reps, suite.warmup, progress, lead_in_s=suite.lead_in_s)
        flops = roofline.flops_forward(cfg, batch, length)
        for impl, m in measured.items():
            framework = "jax" if impl == "jaxgpt" else "onnxruntime" if impl.startswith("onnxruntime") else "torch"
            row = make_result(f"forward b{batch} t{length}", framework, impl, batch, length, m)
            if impl in probes:
                row["thread_probe"] = {str(n): v for n, v in probes[impl].items()}
            rows.append(roofline.annotate(row, flops, roofline.weight_bytes(cfg), limits))
        fastest = lambda prefix: min((k for k in measured if k.startswith(prefix)),
                                     key=lambda k: np.median([r["seconds"] for r in measured[k].runs]), default=None)
        baselines = [(nb_name, "notebook"), (fastest("torch tuned"), "tuned")]
        if models.ort is not None:
            baselines.append((fastest("onnxruntime"), "ort"))
        for slow, label in baselines:
            ratios[f"forward_b{batch}_t{length}_vs_{label}"] = {
                "what": f"forward logits ({batch}, {length}): jaxgpt vs {slow}",
                **paired_ratio(measured[slow].runs, measured["jaxgpt"].runs),
            }
    return rows, ratios
