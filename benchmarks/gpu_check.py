"""The GPU check: parity, the benchmark suite and batch scaling on a GPU, in one budgeted run.

    PYTHONPATH=. python3 -m benchmarks.gpu_check OUTDIR [--budget S] [--max-batch 16384] [--dry-run]

Runs from the repository root with nothing installed (the GPU machine has jax, flax, optax,
torch, numpy, pytest but no package index). Each step is its own process, one after another,
so that no two hold the GPU's memory at once and a failing step does not end the others:

  env        nvidia-smi, versions, `jax.devices()`; the real run stops here unless jax's
             backend is the GPU (every later figure would silently be a CPU's);
  precision  max |logit difference| of jaxgpt (default checkpoint) against the notebook's torch
             model (CPU, float32 and float64) at jax_default_matmul_precision "highest" and at
             the default precision;
  suite      `python -m benchmarks --device gpu --quick` (both frameworks on the GPU, full
             float32), gpu.{json,md,png};
  attention  `python -m benchmarks.tools.decode_attention` (into gpu_check.log): the decode
             step's blocked attention against the whole-cache one. The threshold that picks it
             (`jaxgpt.model.BLOCKED_DECODE_ROWS`) was chosen from CPU measurements alone; this
             shows whether a GPU wants it too;
  sharding   `python -m benchmarks.sharding --real --max-batch N`, sharding_gpu.{json,md};
  parity     tests/test_parity_logits.py and tests/test_sampling_parity.py on the GPU
             (tests/conftest.py sets "highest" there), the output into parity_gpu.txt. Last:
             the precision step and the suite's parity group already give its headline
             figures, and its slow tests take minutes.

Budget: before each step its estimated time (`Step.estimate_s`, guessed from CPU runs; refine
them after a GPU run) is checked against what is left of `--budget` (480 s; a dry run 1800 s,
whatever the CPU); a step that would not fit is skipped and recorded as such, and a running
step is stopped when the budget is spent.
gpu_check.json (rewritten after every step, so a killed run keeps what it finished) records each
step's status, time and command; gpu_check.log holds every step's output. OUTDIR receives at
most 8 files.

`--dry-run` runs every step on the CPU with tiny sizes (a toy model, a subset of the parity
tests) in about a minute, so that the real run cannot fail on a typo or an API difference a CPU
can reveal; tests/test_benchmarks.py runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_TESTS = ("tests/test_parity_logits.py", "tests/test_sampling_parity.py")
# The dry run's subset: one small test of each file.
DRY_PARITY = "V11 or test_small_random_weights and multinomial"
OUTPUTS = ("gpu_check.json", "gpu_check.log", "parity_gpu.txt", "gpu.json", "gpu.md", "gpu.png",
           "sharding_gpu.json", "sharding_gpu.md")


@dataclasses.dataclass
class Step:
    """One step: a command run from the repository root, with its estimated time in seconds."""

    name: str
    argv: list[str]
    estimate_s: float
    capture: str | None = None  # a file of OUTDIR that also receives the step's output
    env: dict = dataclasses.field(default_factory=dict)  # added to the environment of its process
    status: str = "pending"  # ok | failed (exit N) | timed out | skipped (...)
    seconds: float | None = None
    tail: str = ""


def steps(out: str, dry: bool, max_batch: int) -> list[Step]:
    """The check's steps in order; `dry`: on the CPU, tiny sizes."""
    py = [sys.executable]
    me = py + ["-m", "benchmarks.gpu_check"]
    o = lambda name: os.path.join(out, name)
    if dry:
        suite = ["--device", "cpu", "--tiny", "--reps", "1",
                 "--only", "limits,generation,forward,train,porting,compile,parity"]
        sharding = ["--tiny", "--batches", "2", "--max-batch", "4", "--num-chars", "8", "--reps", "1"]
        attention = ["--cases", "8x1", "--rounds", "1"]
        parity = ["-k", DRY_PARITY]
    else:
        suite = ["--device", "gpu", "--quick"]
        sharding = ["--max-batch", str(max_batch), "--reps", "3"]
        attention = ["--cases", "1x1,8x1,64x1,8x64,64x16,256x16", "--rounds", "5"]
        parity = []
    return [
        Step("env", me + ["--child", "env"] + (["--dry-run"] if dry else []), 5 if dry else 20),
        Step("precision", me + ["--child", "precision"] + (["--dry-run"] if dry else []), 10 if dry else 45,
             capture="parity_gpu.txt"),
        # The suite's compile group starts fresh jax processes while the suite's own holds the GPU:
        # each may take 35% of its memory instead of JAX's default 75%.
        Step("suite", py + ["-m", "benchmarks", *suite, "--json", o("gpu.json"), "--markdown", o("gpu.md"),
                            "--plot", o("gpu.png")], 40 if dry else 240,
             env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.35"}),
        Step("attention", py + ["-m", "benchmarks.tools.decode_attention", *attention, "--ragged-rounds", "0"],
             20 if dry else 90),
        Step("sharding", py + ["-m", "benchmarks.sharding", "--real", *sharding, "--json", o("sharding_gpu.json"),
                               "--markdown", o("sharding_gpu.md")], 15 if dry else 120),
        Step("parity", py + ["-m", "pytest", *PARITY_TESTS, "-q", "-p", "no:cacheprovider", *parity],
             15 if dry else 180, capture="parity_gpu.txt"),
    ]


def _environment(dry: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if dry:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.pop("JAX_PLATFORMS", None)
    return env


def run_step(step: Step, env: dict, limit_s: float, out: str, log) -> None:
    """Runs `step` for at most `limit_s` seconds; its output goes to `log` (and `step.capture`)."""
    log.write(f"\n===== {step.name}: {' '.join(step.argv)}\n")
    log.flush()
    begin = time.perf_counter()
    try:
        done = subprocess.run(step.argv, cwd=ROOT, env={**env, **step.env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              text=True, timeout=max(limit_s, 1))
        output, step.status = done.stdout, "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        step.status = f"timed out after {limit_s:.0f} s (budget)"
    step.seconds = time.perf_counter() - begin
    step.tail = output[-2000:]
    log.write(output + f"\n===== {step.name}: {step.status} in {step.seconds:.1f} s\n")
    log.flush()
    if step.capture:
        with open(os.path.join(out, step.capture), "a", encoding="utf-8") as f:
            f.write(f"===== {step.name}: {' '.join(step.argv[1:])}\n{output}\n===== {step.status}\n\n")


def _backend(output: str) -> str | None:
    """jax's backend as the env step's last line (a JSON document) reports it."""
    try:
        return json.loads(output.strip().splitlines()[-1])["backend"]
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _record(path: str, doc: dict, plan: list[Step]) -> None:
    doc["steps"] = [{k: v for k, v in dataclasses.asdict(s).items()} for s in plan]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def check(out: str, budget_s: float, dry: bool, max_batch: int) -> int:
    """Runs every step that fits in `budget_s`; returns 0 if all ran and passed."""
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder starts clean
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    plan, env = steps(out, dry, max_batch), _environment(dry)
    began = time.perf_counter()
    doc = {"check": "gpu", "dry_run": dry, "budget_s": budget_s, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                        time.gmtime())}
    with open(os.path.join(out, "gpu_check.log"), "w", encoding="utf-8") as log:
        for step in plan:
            left = budget_s - (time.perf_counter() - began)
            if plan[0].status != "ok" and step is not plan[0]:
                step.status = "skipped (the env step did not pass)"
            elif step.estimate_s > left:
                step.status = f"skipped (needs ~{step.estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left)"
            else:
                print(f"[{time.perf_counter() - began:6.1f}s] {step.name} (~{step.estimate_s:.0f} s)",
                      file=sys.stderr, flush=True)
                run_step(step, env, left, out, log)
                if step.name == "env" and step.status == "ok" and not dry and _backend(step.tail) != "gpu":
                    step.status = f"failed (jax's backend is {_backend(step.tail)}, not the GPU; nothing else run)"
            print(f"  {step.name}: {step.status}", file=sys.stderr, flush=True)
            doc["elapsed_s"] = time.perf_counter() - began
            _record(os.path.join(out, "gpu_check.json"), doc, plan)
    failed = [s.name for s in plan if s.status != "ok"]
    print(f"gpu check {'passed' if not failed else 'incomplete: ' + ', '.join(failed)} "
          f"in {time.perf_counter() - began:.0f} s; files in {out}", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- child steps
def _env_child(dry: bool) -> dict:
    smi = shutil.which("nvidia-smi")
    if smi:
        for args in ([], ["--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"]):
            print(subprocess.run([smi, *args], capture_output=True, text=True).stdout, flush=True)
    else:
        print("nvidia-smi: not found" + (" (dry run)" if dry else ""), flush=True)
    import jax
    import torch

    from benchmarks.harness import device_description, versions

    return {"versions": versions("optax", "torch"), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "device": device_description(),
            "torch_cuda": torch.cuda.is_available(), "torch_cuda_version": torch.version.cuda,
            "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _precision_child(dry: bool) -> dict:
    """Max |logit difference| against the torch model at "highest" and default precision."""
    import jax
    import numpy as np
    import torch
    from flax import nnx

    import jaxgpt
    import porting
    from porting.torch_reference import reference_from_model

    if dry:
        from jaxgpt.config import GPTConfig

        model, weights = jaxgpt.GPT(GPTConfig(context_length=16, model_dim=24, num_blocks=2, num_heads=3),
                                    rngs=nnx.Rngs(0)), "toy model (seeded)"
    else:
        model, weights = porting.load_weights(jaxgpt.DEFAULT_WEIGHTS), "default checkpoint"
    cfg = model.config
    reference = reference_from_model(model)
    rng = np.random.default_rng(1234)
    inputs = [rng.integers(0, cfg.vocab_size, (4, cfg.context_length)) for _ in range(2 if dry else 16)]
    with torch.no_grad():
        want32 = [reference(torch.from_numpy(x)).numpy() for x in inputs]
        reference64 = reference.double()
        want64 = [reference64(torch.from_numpy(x)).numpy() for x in inputs]
    graphdef, state = nnx.split(model)
    scale = max(float(np.abs(w).max()) for w in want64)
    out = {"weights": weights, "inputs": len(inputs), "shape": [4, cfg.context_length], "max_abs_logit": scale,
           "backend": jax.default_backend()}
    for precision in ("highest", "default"):
        with jax.default_matmul_precision(None if precision == "default" else precision):
            forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))  # traced under this precision
            got = [np.asarray(forward(state, x.astype(np.int32))) for x in inputs]
        d32 = max(float(np.abs(g - w).max()) for g, w in zip(got, want32))
        d64 = max(float(np.abs(g - w).max()) for g, w in zip(got, want64))
        out[precision] = {"max_abs_diff_vs_torch_float32": d32, "max_abs_diff_vs_float64": d64,
                          "relative_to_max_logit": d32 / scale, "target_1e-5_x_scale_met": d32 <= 1e-5 * scale}
    for precision in ("highest", "default"):
        r = out[precision]
        print(f"{precision:>8}: max |logit diff| vs torch float32 {r['max_abs_diff_vs_torch_float32']:.2e}, "
              f"vs float64 {r['max_abs_diff_vs_float64']:.2e} (largest |logit| {scale:.3g}; "
              f"target 1e-5 x scale {'met' if r['target_1e-5_x_scale_met'] else 'NOT met'})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", nargs="?", help="where the results go (created if missing)")
    p.add_argument("--budget", type=float, help="seconds for all steps (default 480; a dry run 1800: it checks "
                   "that every step runs, on whatever CPU)")
    p.add_argument("--max-batch", type=int, default=16384, help="largest batch of the scaling step (default 16384)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes (about a minute)")
    p.add_argument("--child", choices=("env", "precision"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        doc = (_env_child if args.child == "env" else _precision_child)(args.dry_run)
        print(json.dumps(doc))
        return 0
    if args.outdir is None:
        p.error("OUTDIR is required")
    budget = args.budget if args.budget is not None else 1800.0 if args.dry_run else 480.0
    if budget <= 0 or args.max_batch < 64 and not args.dry_run:
        p.error("--budget must be > 0 and --max-batch >= 64")
    return check(os.path.abspath(args.outdir), budget, args.dry_run, args.max_batch)


if __name__ == "__main__":
    sys.exit(main())
