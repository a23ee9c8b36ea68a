"""Porting time: `weights.pt` -> a ready model, jaxgpt vs torch.

jaxgpt: `porting.load_weights(path)` (torch-free reader, key mapping, shape checks, a GPT
with its parameters on the device; the clock stops once they are materialised). torch: what
a torch user does to get the same model: `torch.load(path)` + `load_state_dict(strict=True)`
into the notebook's class (construction included, as jaxgpt's includes building the GPT).

Three settings: repeat loads in this process; the first load of a configuration in this
process (jaxgpt's shape-only module built again); and the first load in a fresh Python process
(`fresh_process_runs`: one child per side and round, the sides alternating), timed from after
the imports (jax, flax and porting; torch and the notebook's class) and, separately, with
them (the child's clock starts before its first import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.harness import Measured, interleave, make_result, paired_ratio


_CHILD = r"""
import json, os, sys, time
begin = time.perf_counter()
side, path, threads, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
if side == "jaxgpt":
    import jax
    from flax import nnx
    import porting
    imported, imported_cpu = time.perf_counter(), time.process_time()
    model = porting.load_weights(path)
    jax.block_until_ready(nnx.state(model))
else:
    import importlib.util
    import torch
    torch.set_num_threads(threads)
    # The notebook's class alone (importing the porting package would import jax).
    spec = importlib.util.spec_from_file_location("torch_reference", os.path.join(sys.argv[5], "porting", "torch_reference.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    imported, imported_cpu = time.perf_counter(), time.process_time()
    model = reference.make_reference(**config)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
done, done_cpu = time.perf_counter(), time.process_time()
print(json.dumps({"seconds": done - imported, "with_imports": done - begin, "cpu_seconds": done_cpu - imported_cpu}))
"""


def fresh_process_runs(path: str, config, rounds: int, torch_threads: int) -> dict[str, list[dict[str, float]]]:
    """Side ("jaxgpt", "torch") -> per round {"seconds": the first load in a fresh process,
    imports excluded, "with_imports": from the child's first import to the ready model,
    "cpu_seconds": the process's CPU time (all threads) of "seconds"}; one
    child per side and round, the first side alternating by round. jaxgpt imports jax, flax
    and porting; torch imports torch and the notebook's class (porting/torch_reference.py as a
    lone module)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fields = {"variant": config.variant, "vocab_size": config.vocab_size, "context_length": config.context_length,
              "model_dim": config.model_dim, "num_blocks": config.num_blocks, "num_heads": config.num_heads,
              "dropout": config.dropout}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    runs = {"jaxgpt": [], "torch": []}
    for r in range(rounds):
        for side in (("jaxgpt", "torch") if r % 2 == 0 else ("torch", "jaxgpt")):
            out = subprocess.run([sys.executable, "-c", _CHILD, side, os.path.abspath(path), str(torch_threads),
                                  json.dumps(fields), root], env=env, capture_output=True, text=True, check=True,
                                 timeout=300)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """Times porting `models.weights_path`. Returns (rows, ratios); ratio = torch time / jaxgpt time."""
    import jax
    import torch
    from flax import nnx

    import porting
    from benchmarks.threads import probe_threads, torch_threads
    from porting.torch_reference import reference_from_config

    path, cfg = models.weights_path, models.config

    def jax_case(warm: bool):
        begin = time.perf_counter()
        model = porting.load_weights(path)
        jax.block_until_ready(nnx.state(model))
        return {"seconds": time.perf_counter() - begin}

    def jax_first_case(warm: bool):  # the first load of a configuration in a process builds the shape-only module
        porting.load._abstract_model.cache_clear()
        return jax_case(warm)

    def torch_case(warm: bool):
        begin = time.perf_counter()
        model = reference_from_config(cfg)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return {"seconds": time.perf_counter() - begin}

    # torch at the thread count a probe finds fastest for this very load, like every torch side of the suite
    threads, probe = probe_threads({"load": (1, lambda: torch_case(True))}, suite.torch_threads)
    with torch_threads(threads):
        measured = interleave({"jaxgpt load_weights": jax_case, "jaxgpt load_weights, first in the process": jax_first_case,
                               "torch.load + load_state_dict": torch_case},
                              suite.porting_reps, suite.warmup, progress)
    fresh = fresh_process_runs(path, cfg, suite.porting_reps, threads)
    measured["jaxgpt load_weights, fresh process"] = Measured(fresh["jaxgpt"], [])
    measured["torch.load + load_state_dict, fresh process"] = Measured(fresh["torch"], [])
    size = os.path.getsize(path)
    rows = []
    for impl, m in measured.items():
        row = make_result("port weights.pt", "jax" if impl.startswith("jaxgpt") else "torch", impl, 1, 0, m,
                          params=cfg.num_params(), file_bytes=size)
        row["chars_per_s"] = None  # not a character throughput
        if row["framework"] == "torch":
            row.update(threads=threads, thread_probe={str(n): v for n, v in probe.items()})
        rows.append(row)
    ratios = {"porting_vs_torch_load": {
        "what": f"loading a {cfg.num_params():,}-parameter weights.pt into a ready model: jaxgpt vs torch",
        **paired_ratio(measured["torch.load + load_state_dict"].runs, measured["jaxgpt load_weights"].runs),
    }, "porting_first_load_vs_torch_load": {
        "what": "the same, the first load of its configuration in the process (the shape-only module built)",
        **paired_ratio(measured["torch.load + load_state_dict"].runs,
                       measured["jaxgpt load_weights, first in the process"].runs),
    }, "porting_fresh_process_vs_torch_load": {
        "what": "the same, the first load in a fresh process, both sides' imports excluded",
        **paired_ratio(fresh["torch"], fresh["jaxgpt"]),
    }, "porting_fresh_process_cpu_vs_torch_load": {
        "what": "the same, its CPU time (all threads; less moved by other jobs than the wall time)",
        **paired_ratio(fresh["torch"], fresh["jaxgpt"], "cpu_seconds", "cpu_seconds"),
    }, "porting_fresh_process_with_imports_vs_torch_load": {
        "what": "the same, the first load in a fresh process, both sides' imports included (jax, flax, porting; torch)",
        **paired_ratio(fresh["torch"], fresh["jaxgpt"], "with_imports", "with_imports"),
    }}
    return rows, ratios
