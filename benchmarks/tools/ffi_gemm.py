"""jaxgpt with its matrix products in OpenBLAS (a `jax.ffi` custom call) against XLA:CPU's own.

    python -m benchmarks.tools.ffi_gemm [--rounds 9] [--threads 1,2] [--gen-chars 127]

ONNX Runtime's lead on this CPU is its matrix products (benchmarks/results/onnx_notes.md). This
tool measures what a well-kept CPU BLAS would give in XLA's place: it builds a small XLA FFI
handler (`ffi_gemm.cc`, with g++ and jaxlib's headers, into a temporary directory) that calls
the `cblas_sgemm` of the OpenBLAS numpy ships with, registers it as a custom call, and
compiles the shipped model with every `ops.project` (the q/k/v, output, MLP and vocabulary
products, the q/k/v one still in its `QKV_PARTS` float32 chains) replaced by that call. Timed
interleaved in one process (`benchmarks.harness`), against the shipped programs:

* the forward logits at (1, 128) and (8, 128) (ONNX Runtime's weakest and strongest lead);
* `generate_tokens` at batch 1 from the seed token (`--gen-chars`; 127 is the decode steps
  only, 400 adds the full-window steps).

For each OpenBLAS thread count it prints the medians (wall and process CPU time), XLA's time
over OpenBLAS's, the logits' max |difference| from the notebook model's (torch) and whether
the generated tokens are XLA's. The model code is untouched; nothing here ships. Needs g++ on
PATH and numpy's bundled OpenBLAS (numpy >= 2 wheels: `numpy.libs/libscipy_openblas64_*.so`).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

TARGET = "jaxgpt_openblas_matmul"


def _build(directory: str) -> ctypes.CDLL:
    """Compiles ffi_gemm.cc into `directory` and loads it."""
    import jax

    if shutil.which("g++") is None:
        raise SystemExit("ffi_gemm: needs g++ on PATH to build its custom call")
    source = os.path.join(os.path.dirname(__file__), "ffi_gemm.cc")
    library = os.path.join(directory, "libjaxgpt_ffi_gemm.so")
    subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", source,
                    "-o", library], check=True)
    return ctypes.CDLL(library)


def _openblas() -> ctypes.CDLL:
    """numpy's bundled OpenBLAS (64-bit integer interface, `scipy_` symbol prefix)."""
    found = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*.so"))
    if not found:
        raise SystemExit("ffi_gemm: numpy's bundled OpenBLAS (numpy.libs/libscipy_openblas64_*.so) was not found")
    return ctypes.CDLL(found[0])


def _register(ffi_library: ctypes.CDLL, blas: ctypes.CDLL) -> None:
    import jax

    ffi_library.jaxgpt_set_sgemm(ctypes.cast(blas.scipy_cblas_sgemm64_, ctypes.c_void_p))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(ffi_library.JaxgptMatMul), platform="cpu")


def openblas_project(x, kernel, parts: int = 1):
    """`ops.project`'s forward (the same float32 chains) with each product an OpenBLAS call."""
    import jax
    import jax.numpy as jnp

    def product(a, b):
        out = jax.ShapeDtypeStruct(a.shape[:-1] + (b.shape[1],), jnp.float32)
        return jax.ffi.ffi_call(TARGET, out)(a.astype(jnp.float32), b.astype(jnp.float32))

    if not (parts > 1 and x.ndim >= 2 and x.shape[-2] > 1):
        return product(x, kernel)
    size = kernel.shape[0]
    step = -(-size // min(parts, size))
    out = None
    for start in range(0, size, step):
        part = product(x[..., start : start + step], kernel[start : start + step])
        out = part if out is None else out + part
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.ffi_gemm")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", default="1,2", help="OpenBLAS thread counts, comma-separated")
    parser.add_argument("--gen-chars", type=int, default=127, help="generate_tokens length at batch 1 (0: none)")
    args = parser.parse_args(argv)

    import jax
    import torch
    from flax import nnx

    import jaxgpt
    import jaxgpt.model as model_module
    import porting
    from benchmarks import harness
    from benchmarks.tools import ab
    from jaxgpt import engine
    from jaxgpt.cli import default_weights
    from porting.torch_reference import reference_from_model

    threads = [int(t) for t in args.threads.split(",")]
    blas = _openblas()
    with tempfile.TemporaryDirectory() as directory:
        _register(_build(directory), blas)
    model = porting.load_weights(default_weights())
    graphdef, state = nnx.split(model)
    reference = reference_from_model(model)
    sampler = jaxgpt.Sampler(model)
    shipped_project = model_module.project

    def compiled():
        """(forward, generate) programs, traced with whatever `model_module.project` is now."""
        forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        generate = engine._for_platform(engine.generate.__wrapped__, donate_argnums=(2,), options=engine.LOOP_OPTIONS)
        return forward, generate

    programs = {"xla": compiled()}
    for n in threads:
        programs[f"openblas {n}t"] = compiled()
    shipped_generate = engine.generate

    def use(variant):
        """Makes `variant` the programs and the project function traced by their first call."""
        if variant != "xla":
            blas.scipy_openblas_set_num_threads64_(int(variant.split()[1][:-1]))
        model_module.project = shipped_project if variant == "xla" else openblas_project
        engine.generate = programs[variant][1]

    results, inputs, current = {}, {}, {}
    works = []
    for b in (1, 8):
        tokens = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, model.config.context_length))

        def forward_work(tokens=tokens):
            return np.asarray(current["forward"](state, tokens))
        forward_work.__name__ = f"forward ({b}, 128)"
        inputs[forward_work.__name__] = tokens
        works.append(forward_work)
    if args.gen_chars:
        works.append(ab.generation(sampler, 1, args.gen_chars))

    def case(variant, work):
        run = ab.variant_case(use, variant, work, results)

        def timed(warm):
            current["forward"] = programs[variant][0]
            cpu = time.process_time()
            result = dict(run(warm))
            return {**result, "cpu_seconds": time.process_time() - cpu}
        return timed

    print(harness.cpu_description(), f"load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}", flush=True)
    try:
        measured = harness.interleave({(v, w.__name__): case(v, w) for w in works for v in programs}, args.rounds)
    finally:
        use("xla")
        engine.generate = shipped_generate
    for w in works:
        print(f"\n## {w.__name__}, {args.rounds} interleaved rounds")
        print("| products | median ms | CPU ms | XLA / this | agreement |\n| --- | ---: | ---: | ---: | --- |")
        base = measured["xla", w.__name__].runs
        for v in programs:
            runs = measured[v, w.__name__].runs
            stats = harness.stats_of(runs)
            cpu = harness.stats_of(runs, "cpu_seconds").median
            ratio = harness.paired_ratio(base, runs)["ratio"]
            print(f"| {v} | {stats.median * 1e3:.2f} | {cpu * 1e3:.2f} | {ratio:.2f}x | "
                  f"{_agreement(results, v, w.__name__, inputs, reference, torch)} |")
    return 0


def _agreement(results, variant, name, inputs, reference, torch) -> str:
    out = results[variant, name]
    if name in inputs:  # a forward
        with torch.no_grad():
            expected = reference(torch.from_numpy(inputs[name])).numpy()
        return f"max abs logit diff vs torch {np.abs(out - expected).max():.1e}"
    return "same tokens as XLA" if np.array_equal(out, results["xla", name]) else "TOKENS DIFFER from XLA"


if __name__ == "__main__":
    sys.exit(main())
