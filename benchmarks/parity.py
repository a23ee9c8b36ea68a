"""Do both frameworks compute the same thing? Logits, greedy tokens and sampled text.

- logits: max |jaxgpt - reference| over `parity_inputs` random `(4, C)` token batches. The
  model is causal, so one full-length forward checks every prefix length 1..C at once.
- greedy: `generate_tokens(temperature=0)` vs the reference loop with argmax, from the
  notebook's seed context, `greedy_tokens` characters (a near-tie can flip one argmax and the
  texts then diverge for good, so the first divergence is reported with the agreement).
- sampled: jaxgpt's own uniforms (`jaxgpt.sampling.sampling_uniforms`) fed to the reference
  loop with inverse-CDF sampling (`porting.torch_reference.inverse_cdf_generate`).
- strided: jaxgpt strided vs the tuned torch strided twin with the same uniforms (the
  reference has no strided mode; the twin matches the reference's logits to 1e-5).
- onnxruntime (with the `[onnx]` extra): the exported notebook model's logits against jaxgpt
  and against torch on the same inputs, and its greedy notebook loop against jaxgpt's greedy
  tokens.
"""

from __future__ import annotations

import numpy as np


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    equal = np.asarray(a) == np.asarray(b)
    mismatch = np.flatnonzero(~equal.all(axis=0))
    return {
        "tokens": int(equal.size),
        "agreement": float(equal.mean()),
        "first_divergence": int(mismatch[0]) if mismatch.size else None,
    }


def run(models, suite, limits=None, progress=None) -> dict:
    """Returns the parity figures (a dict for the JSON's "parity")."""
    import jax
    import torch
    from flax import nnx

    from benchmarks.threads import probe_threads, torch_threads
    from jaxgpt.generate import default_stride, generate_tokens
    from jaxgpt.sampling import sampling_uniforms
    from porting.torch_reference import inverse_cdf_generate

    say = progress or (lambda _: None)
    cfg, dev = models.config, models.torch_device
    c = cfg.context_length
    out = {"weights": models.weights_source, "tuned_vs_reference_max_abs_logit_diff": models.tuned_max_diff}

    say("parity: logits")
    graphdef, state = nnx.split(models.jax)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    rng = np.random.default_rng(1234)
    worst, total, scale = 0.0, 0.0, 0.0
    ort_worst = {"jaxgpt": 0.0, "torch": 0.0}
    for _ in range(suite.parity_inputs):
        tokens = rng.integers(0, cfg.vocab_size, (4, c))
        with torch.no_grad():
            ref = models.reference(torch.from_numpy(tokens).to(dev)).cpu().numpy()
        ours = np.asarray(forward(state, tokens.astype(np.int32)))
        diff = np.abs(ours - ref)
        worst, total = max(worst, float(diff.max())), total + float(diff.mean())
        scale = max(scale, float(np.abs(ref).max()))
        if models.ort is not None:
            theirs = models.ort.logits(tokens)
            for name, other in (("jaxgpt", ours), ("torch", ref)):
                ort_worst[name] = max(ort_worst[name], float(np.abs(theirs - other).max()))
    out["logits"] = {"inputs": suite.parity_inputs, "shape": [4, c], "max_abs_diff": worst,
                     "mean_abs_diff": total / suite.parity_inputs, "max_abs_logit": scale,
                     "max_diff_relative_to_max_logit": worst / scale if scale else None}

    seed_context = np.zeros((1, 1), np.int64)
    # The long reference loops run at the thread count that is fastest here (numerics are the
    # same model's; only the wall time changes).
    window = torch.zeros((1, c), dtype=torch.long, device=dev)
    threads, _ = probe_threads({"window": (1, lambda: models.reference(window).cpu())}, suite.torch_threads)
    say(f"parity: greedy {suite.greedy_tokens} tokens (reference loop, {threads} torch threads)")
    n = suite.greedy_tokens
    jx = generate_tokens(models.jax, seed_context, n, temperature=0)
    with torch_threads(threads):
        th = inverse_cdf_generate(models.reference, torch.from_numpy(seed_context).to(dev), torch.zeros(1, n), c,
                                  temperature=0).cpu().numpy()
    out["greedy"] = _agreement(jx, th)
    if models.ort is not None:
        from benchmarks import onnx_runtime

        say(f"parity: onnxruntime greedy {n} tokens (notebook loop)")
        ort = onnx_runtime.notebook_loop(models.ort, n, seed_context, c, models.ort.threads[0], greedy=True)
        out["onnxruntime"] = {"max_abs_logit_diff_vs_jaxgpt": ort_worst["jaxgpt"],
                              "max_abs_logit_diff_vs_torch": ort_worst["torch"], "inputs": suite.parity_inputs,
                              "shape": [4, c], "greedy_vs_jaxgpt": _agreement(jx, ort)}

    say(f"parity: sampled {suite.sampled_rows}x{suite.sampled_tokens} tokens (reference loop)")
    rows, n = suite.sampled_rows, suite.sampled_tokens
    context = np.zeros((rows, 1), np.int64)
    uniforms = sampling_uniforms(7, rows, n)
    jx = generate_tokens(models.jax, context, n, seed=7)
    with torch_threads(threads):
        th = inverse_cdf_generate(models.reference, torch.from_numpy(context).to(dev), torch.tensor(uniforms, device=dev), c)
    out["sampled"] = {**_agreement(jx, th.cpu().numpy()), "rows": rows, "seed": 7, "temperature": 1.0}

    say("parity: strided (tuned torch twin)")
    from benchmarks.torch_tuned import TunedGenerator

    stride = suite.stride or default_stride(c)
    n = suite.greedy_tokens
    uniforms = sampling_uniforms(11, 1, n)
    jx = generate_tokens(models.jax, seed_context, n, seed=11, mode="strided", stride=stride)
    with torch_threads(threads):
        th = TunedGenerator(models.tuned).generate(torch.from_numpy(seed_context).to(dev), n, keep=c + 1 - stride,
                                                   uniforms=torch.tensor(uniforms, device=dev))
    out["strided_vs_tuned_twin"] = {**_agreement(jx, th.cpu().numpy()), "stride": stride, "seed": 11}
    return out
