"""Candidate changes to jaxgpt's forward, timed interleaved against the shipped one and ONNX Runtime.

    python -m benchmarks.tools.forward_variants [--batches 1,8,64] [--rounds 15]

The model code is not touched: each variant is the shipped `GPT.__call__` compiled with other
XLA:CPU options (`jax.jit(compiler_options=...)`), or a standalone re-statement of the forward
with one thing changed (the layout of the attention products). Every variant's logits must stay
within 1e-5 x the largest |logit| of the notebook model's (torch, float32); its median time per
forward at (B, 128) over `--rounds` interleaved rounds is printed next to ONNX Runtime's (the
suite's export, each session thread count), with the wall and the process CPU time (on a shared
machine the CPU time is the steadier figure). Results: benchmarks/results/onnx_notes.md.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np

# name -> XLA:CPU DebugOptions overrides of the shipped forward
OPTIONS = {
    "shipped": None,
    "eigen dots (YNNPACK off)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "concurrency scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "512-bit vectors": {"xla_cpu_prefer_vector_width": 512},
}


def _heads_first_forward(model):
    """The forward with attention products on the fused projection's own (B, T, H, K) layout:
    no transposes of q, k, v (the shipped attention transposes them to (B, H, T, K))."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.ops import layer_norm

    graphdef, state = nnx.split(model)
    cfg = model.config

    def forward(state, tokens):
        m = nnx.merge(graphdef, state)
        t = tokens.shape[1]
        x = m.token_embedding(tokens) + m.pos_embedding.embedding[...][:t]
        mask = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        for block in m.blocks:
            a = block.attention
            h = layer_norm(x, block.norm1.scale[...], block.norm1.bias[...])
            w = a.qkv[...]
            qkv = (h @ w.reshape(w.shape[0], -1)).reshape(*h.shape[:2], *w.shape[1:])  # (B, T, 3, H, K)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            scores = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(cfg.head_size)
            probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
            heads = jnp.einsum("bhts,bshk->bthk", probs, v).reshape(*h.shape[:2], -1)
            if a.out_kernel is not None:
                ow = a.out_kernel[...]
                heads = heads @ ow.reshape(-1, ow.shape[-1]) + a.out_bias[...]
            x = x + heads
            h = layer_norm(x, block.norm2.scale[...], block.norm2.bias[...])
            x = x + block.mlp(h)
        return m.vocab_projection(layer_norm(x, m.final_norm.scale[...], m.final_norm.bias[...]))

    return jax.jit(forward), state


def main(argv=None) -> None:
    import jax
    import torch
    from flax import nnx

    import jaxgpt
    import porting
    from benchmarks import onnx_runtime
    from benchmarks.harness import cpu_description, interleave, summarize
    from porting.torch_reference import reference_from_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.forward_variants")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--only", help="comma-separated substrings: run only the variants whose names contain one "
                   "(the shipped forward and ONNX Runtime always run)")
    args = p.parse_args(argv)
    model = porting.load_weights(jaxgpt.DEFAULT_WEIGHTS)
    reference = reference_from_model(model)
    c = model.config.context_length
    graphdef, state = nnx.split(model)
    print(f"{cpu_description()}; load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}")
    with tempfile.TemporaryDirectory(prefix="forward-variants-") as workdir:
        ort = onnx_runtime.OrtModel(onnx_runtime.export(reference, os.path.join(workdir, "m.onnx"), model.config))
        for b in (int(v) for v in args.batches.split(",")):
            tokens = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, c))
            with torch.no_grad():
                want = reference(torch.from_numpy(tokens)).numpy()
            tolerance = 1e-5 * max(1.0, float(np.abs(want).max()))
            x = jax.device_put(tokens.astype(np.int32))
            programs = {name: (jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), compiler_options=o), state)
                        for name, o in OPTIONS.items()}
            programs["attention on (B, T, H, K)"] = _heads_first_forward(model)
            # Not a design (one compilation per checkpoint): shows what XLA gains when it may treat
            # the weights as constants (pre-packed matrices, as ONNX Runtime's MLAS does at load).
            programs["weights as compile-time constants"] = (jax.jit(lambda _, x: nnx.merge(graphdef, state)(x)),
                                                             None)
            if args.only:
                keep = [w.strip() for w in args.only.split(",")]
                programs = {k: v for k, v in programs.items() if k == "shipped" or any(w in k for w in keep)}
            cases, diffs = {}, {}
            for name, (fn, st) in programs.items():
                diffs[name] = float(np.abs(np.asarray(fn(st, x)) - want).max())

                def case(warm, fn=fn, st=st):
                    wall, cpu = time.perf_counter(), time.process_time()
                    fn(st, x).block_until_ready()
                    return {"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

                cases[name] = case
            for n in ort.threads:
                diffs[f"onnxruntime, {n} threads"] = float(np.abs(ort.logits(tokens, n) - want).max())

                def ort_case(warm, n=n):
                    wall, cpu = time.perf_counter(), time.process_time()
                    ort.logits(tokens, n)
                    return {"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

                cases[f"onnxruntime, {n} threads"] = ort_case
            measured = interleave(cases, args.rounds, 2)
            shipped = summarize([r["seconds"] for r in measured["shipped"].runs]).median
            print(f"\n## forward ({b}, {c}), {args.rounds} interleaved rounds; tolerance {tolerance:.1e}")
            print("| variant | median ms | CPU ms | shipped / variant | max abs logit diff vs torch |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for name, m in measured.items():
                wall = summarize([r["seconds"] for r in m.runs]).median
                cpu = summarize([r["cpu"] for r in m.runs]).median
                ok = "" if diffs[name] <= tolerance else " (OUTSIDE)"
                print(f"| {name} | {1e3 * wall:.2f} | {1e3 * cpu:.2f} | {shipped / wall:.2f}x | {diffs[name]:.1e}{ok} |")


if __name__ == "__main__":
    main()
