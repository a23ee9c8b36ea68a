"""Where ONNX Runtime's forward spends its time, next to jaxgpt's compiled forward.

    python -m benchmarks.tools.ort_profile [--batches 1,64] [--runs 20] [--threads N]

Exports the notebook model (default checkpoint) as the suite does, runs ORT's session profiler
over `--runs` forwards at (B, 128) and prints the time per operator type (the fused kernels ORT's
graph optimiser made: MatMul, FusedMatMul, Softmax, LayerNormalization, ...) and the optimised
graph's operator counts; then jaxgpt's compiled forward: its time and the HLO operations of
the optimised program (dots, fusions, custom calls), so the two can be compared kernel by kernel.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np


def ort_profile(ort_path: str, tokens: np.ndarray, runs: int, threads: int, workdir: str) -> dict:
    """Per-operator-type microseconds per forward, from ORT's own session profile."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(workdir, "ort")
    options.optimized_model_filepath = os.path.join(workdir, "optimized.onnx")
    session = ort.InferenceSession(ort_path, options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"tokens": tokens})
    begin = time.perf_counter()
    for _ in range(runs):
        session.run(None, {"tokens": tokens})
    wall = (time.perf_counter() - begin) / runs
    events = json.load(open(session.end_profiling()))
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    graph = onnx.load(options.optimized_model_filepath).graph
    total_runs = runs + 3
    return {"wall_ms": 1e3 * wall, "us_per_forward": {k: v / total_runs for k, v in by_op.most_common()},
            "optimized_ops": dict(collections.Counter(n.op_type for n in graph.node).most_common())}


def jax_profile(model, tokens: np.ndarray, runs: int) -> dict:
    """jaxgpt's forward: wall time per call and the optimised HLO's operation counts."""
    import re

    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    x = jax.device_put(tokens.astype(np.int32))
    hlo = forward.lower(state, x).compile().as_text()
    for _ in range(3):
        forward(state, x).block_until_ready()
    begin = time.perf_counter()
    for _ in range(runs):
        forward(state, x).block_until_ready()
    wall = (time.perf_counter() - begin) / runs
    entry = hlo[hlo.index("ENTRY"):]
    ops = collections.Counter(m.group(1) for m in re.finditer(r"= \S+ (\w[\w-]*)\(", entry))
    dots = collections.Counter(re.findall(r"= (f32\[[\d,]+\])\S* (?:dot|convolution)\(", hlo))
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    return {"wall_ms": 1e3 * wall, "entry_ops": dict(ops.most_common()), "dot_shapes": dict(dots.most_common()),
            "custom_calls": dict(calls)}


def main(argv=None) -> None:
    import jaxgpt
    import porting
    from benchmarks import onnx_runtime
    from porting.torch_reference import reference_from_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.ort_profile")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    model = porting.load_weights(jaxgpt.DEFAULT_WEIGHTS)
    c = model.config.context_length
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as workdir:
        path = onnx_runtime.export(reference_from_model(model), os.path.join(workdir, "model.onnx"), model.config)
        for b in (int(v) for v in args.batches.split(",")):
            tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (b, c)).astype(np.int64)
            o = ort_profile(path, tokens, args.runs, args.threads, workdir)
            j = jax_profile(model, tokens, args.runs)
            print(f"\n## forward ({b}, {c}): onnxruntime {o['wall_ms']:.2f} ms ({args.threads} threads), "
                  f"jaxgpt {j['wall_ms']:.2f} ms")
            total = sum(o["us_per_forward"].values())
            print("onnxruntime time per operator type (us per forward, share of kernel time):")
            for op, us in o["us_per_forward"].items():
                print(f"  {op:28s} {us:9.0f}  {100 * us / total:5.1f}%")
            print("onnxruntime optimised graph:", o["optimized_ops"])
            print("jaxgpt optimised HLO, entry computation:", j["entry_ops"])
            print("jaxgpt dot outputs:", j["dot_shapes"], "custom calls:", j["custom_calls"])


if __name__ == "__main__":
    main()
