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

Each of those cases times one call, right after the other cases of the round: a cold call, which
on this project's VMs costs XLA:CPU more than the others (its second core's worker contributes
little after an idle spell; `benchmarks/results/cpu_quiet.md`). The "back to back" cases time
`BACK_TO_BACK` consecutive calls per run (seconds per call) for jaxgpt and ONNX Runtime, closer
to a caller that keeps the model busy; they have a ratio of their own.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import roofline
from benchmarks.harness import interleave, make_result, paired_ratio

BACK_TO_BACK = 5  # calls per run of a "back to back" case
BACK = "back to back: "  # the prefix of those cases' names


def _torch_case(fn, tokens, ctx_factory, threads=None):
    from benchmarks.threads import torch_threads

    def case(warm: bool):
        with ctx_factory(), torch_threads(threads):
            begin = time.perf_counter()
            fn(tokens).cpu()  # device sync
            return {"seconds": time.perf_counter() - begin}

    return case


def _ort_case(ort_model, tokens_np, threads, calls=1):
    tokens = tokens_np.astype(np.int64)

    def case(warm: bool):
        begin = time.perf_counter()
        for _ in range(calls):
            ort_model.logits(tokens, threads)  # returns numpy: synchronous
        return {"seconds": (time.perf_counter() - begin) / calls}

    return case


def _jax_cases(model, tokens_np, calls):
    """The jaxgpt case of one call and that of `calls` calls back to back, of one compiled forward."""
    import jax
    from flax import nnx

    from jaxgpt.train import step_compiler_options

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), compiler_options=step_compiler_options(
        tokens=int(np.prod(tokens_np.shape))))
    tokens = jax.device_put(tokens_np)

    def timed(n):
        def case(warm: bool):
            begin = time.perf_counter()
            for _ in range(n):
                forward(state, tokens).block_until_ready()
            return {"seconds": (time.perf_counter() - begin) / n}

        return case

    return timed(1), timed(calls)


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
        jax_single, jax_back_to_back = _jax_cases(models.jax, tokens_np, BACK_TO_BACK)
        cases = {nb_name: _torch_case(models.reference, tokens, torch.no_grad, nb_threads), "jaxgpt": jax_single}
        for n in dict.fromkeys([torch.get_num_threads(), *suite.torch_threads]):
            cases[f"torch tuned eager, {plural(n)}"] = _torch_case(models.tuned, tokens, torch.inference_mode, n)
        if compiled_forward is not None:
            cases[f"torch tuned compiled, {plural(torch.get_num_threads())}"] = _torch_case(
                compiled_forward, tokens, torch.inference_mode)
        if models.ort is not None:  # every session thread count, the fastest median counting
            for n in models.ort.threads:
                cases[f"onnxruntime, {plural(n)}"] = _ort_case(models.ort, tokens_np, n)
                cases[f"{BACK}onnxruntime, {plural(n)}"] = _ort_case(models.ort, tokens_np, n, BACK_TO_BACK)
            cases[f"{BACK}jaxgpt"] = jax_back_to_back
        probes = {nb_name: nb_probe}
        measured = interleave(cases, suite.reps, suite.warmup, progress, lead_in_s=suite.lead_in_s)
        flops = roofline.flops_forward(cfg, batch, length)
        for impl, m in measured.items():
            side = impl.removeprefix(BACK)
            framework = "jax" if side == "jaxgpt" else "onnxruntime" if side.startswith("onnxruntime") else "torch"
            row = make_result(f"forward b{batch} t{length}", framework, impl, batch, length, m)
            if impl in probes:
                row["thread_probe"] = {str(n): v for n, v in probes[impl].items()}
            rows.append(roofline.annotate(row, flops, roofline.weight_bytes(cfg), limits))
        fastest = lambda prefix: min((k for k in measured if k.startswith(prefix)),
                                     key=lambda k: np.median([r["seconds"] for r in measured[k].runs]), default=None)
        baselines = [(nb_name, "notebook"), (fastest("torch tuned"), "tuned")]
        pairs = [(slow, "jaxgpt", label) for slow, label in baselines]
        if models.ort is not None:
            pairs += [(fastest("onnxruntime"), "jaxgpt", "ort"),
                      (fastest(f"{BACK}onnxruntime"), f"{BACK}jaxgpt", "ort_back_to_back")]
        for slow, fast, label in pairs:
            what = f"forward logits ({batch}, {length}): jaxgpt vs {slow}"
            if fast.startswith(BACK):
                what = (f"forward logits ({batch}, {length}), {BACK_TO_BACK} calls back to back: jaxgpt vs "
                        f"{slow.removeprefix(BACK)}")
            ratios[f"forward_b{batch}_t{length}_vs_{label}"] = {
                "what": what, **paired_ratio(measured[slow].runs, measured[fast].runs),
            }
    return rows, ratios
