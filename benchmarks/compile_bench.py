"""Compile time of jaxgpt's generation: cold, and with JAX's persistent compilation cache warm.

Each measurement is a fresh Python process (`python -m benchmarks.compile_bench child ...`),
so nothing stays in memory between them: it loads the weights, then times the first
`generate_tokens` call (compilation + run) and a second identical call (run only). The
"cold" process gets an empty cache directory, the "warm" one the directory the cold one
filled. compile ~= first call - second call.

The cache is switched on in the child exactly as the CLI does it:
`jaxgpt.compile_cache.enable(cache_dir)` before anything compiles (every program is stored,
however quick to compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import summarize

def _child(weights: str, cache_dir: str, steps: int, batch: int, mode: str) -> dict:
    begin = time.perf_counter()
    import numpy as np

    import porting
    from jaxgpt import compile_cache
    from jaxgpt.generate import generate_tokens

    if compile_cache.enable(cache_dir) != cache_dir:
        raise RuntimeError(f"the compilation cache could not be enabled at {cache_dir}")
    imported = time.perf_counter()
    model = porting.load_weights(weights)
    loaded = time.perf_counter()
    context = np.zeros((batch, 1), np.int32)
    generate_tokens(model, context, steps, seed=0, mode=mode)
    first = time.perf_counter()
    generate_tokens(model, context, steps, seed=1, mode=mode)
    second = time.perf_counter()
    return {
        "import_s": imported - begin,
        "load_s": loaded - imported,
        "first_call_s": first - loaded,
        "second_call_s": second - first,
        "compile_s": (first - loaded) - (second - first),
    }


def _spawn(weights: str, cache_dir: str, steps: int, batch: int, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAXGPT_NO_COMPILE_CACHE"}
    cmd = [sys.executable, "-m", "benchmarks.compile_bench", "child", weights, cache_dir, str(steps), str(batch), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"compile benchmark child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """Cold vs warm-cache compilation of a batch-1 exact generation of up to 64 characters.

    64 characters (the smallest length bucket) keep the run itself short next to the
    compilation, so that first call - second call measures the compilation, not noise.

    Returns:
      (rows, ratios): one row per (cold, warm) with median first-call and compile seconds;
      the ratio is cold first call / warm first call.
    """
    steps = min(suite.gen_steps, 64)
    runs = {"cold": [], "warm cache": []}
    for rep in range(suite.compile_reps):
        with tempfile.TemporaryDirectory(prefix="jaxgpt-cc-") as cache_dir:
            for label in runs:
                if progress is not None:
                    progress(f"compile {label} (rep {rep + 1}/{suite.compile_reps})")
                runs[label].append(_spawn(models.weights_path, cache_dir, steps, 1, "exact"))
            entries = len(os.listdir(cache_dir))
    rows = []
    for label, rs in runs.items():
        first = summarize([r["first_call_s"] for r in rs])
        rows.append({
            "name": f"compile generate b1 {steps} exact ({label})",
            "framework": "jax",
            "impl": f"jaxgpt first call, {label}",
            "batch": 1,
            "steps": steps,
            "chars": steps,
            "seconds": first.median,
            "chars_per_s": None,
            "spread": first.as_dict(),
            "compile_s": summarize([r["compile_s"] for r in rs]).median,
            "steady_call_s": summarize([r["second_call_s"] for r in rs]).median,
            "load_s": summarize([r["load_s"] for r in rs]).median,
            "process": "fresh python process per measurement",
        })
    ratios = {"compile_cold_vs_warm_cache": {
        "what": "first generate call in a fresh process, cold / warm persistent compilation cache (> 1: the cache "
                "helps; not a torch comparison)",
        "ratio": rows[0]["seconds"] / rows[1]["seconds"],
        "paired": summarize([c["first_call_s"] / w["first_call_s"]
                             for c, w in zip(runs["cold"], runs["warm cache"])]).as_dict(),
        "cache_entries": entries,
    }}
    return rows, ratios


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "child":
        sys.exit("usage: python -m benchmarks.compile_bench child WEIGHTS CACHE_DIR STEPS BATCH MODE")
    print(json.dumps(_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])))
