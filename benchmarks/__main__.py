"""`python -m benchmarks [--quick] [--json OUT] [--markdown OUT] [--plot OUT.png] [--device cpu|gpu]`

Runs, in one process, interleaved so that machine noise hits all sides alike:
  limits      measured matmul peak and memory bandwidth (numpy, jax, torch);
  generation  batch 1 (growing context, exact, strided) and larger batches: the notebook's
              loop (torch, and ONNX Runtime with the [onnx] extra), the tuned torch baseline
              (eager and torch.compile'd), jaxgpt exact/strided;
  forward     logits at (1, 128), (8, 128) and (64, 128);
  train       one training step, both frameworks (benchmarks.train_step);
  porting     weights.pt -> ready model;
  compile     jaxgpt's first generate call in fresh processes, cold vs warm persistent cache;
  parity      logits, greedy tokens, sampled tokens with shared uniforms;
  beam_score  beam search (4 x 200 chars) and score (10,000 chars) vs torch (benchmarks.beam_score).
  requests    32 ragged requests in one complete() call vs one by one; logprobs cost (benchmarks.requests_bench).

JSON shape: {"device": str, "versions": {...}, "results": [{"name", "framework" ("jax" |
"torch" | "onnxruntime"), "impl", "batch", "steps", "chars", "seconds" (median), "chars_per_s",
"spread", ...}], "ratios": {key: {"what", "ratio" (torch or onnxruntime time / jaxgpt time),
"paired"}}, "parity": {...}, "limits", "flops_per_char", "notes", ...}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv):
    from benchmarks.settings import GROUPS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (< 10 min on a 2-core CPU)")
    p.add_argument("--json", metavar="OUT", help="write the results document here")
    p.add_argument("--markdown", metavar="OUT", help="write a Markdown report here")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG bar chart of the ratios here")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where both frameworks run (default cpu)")
    p.add_argument("--weights", metavar="PT", help="torch weights.pt to benchmark (default: the project's default "
                   "checkpoint if installed, else seeded random weights of the published config)")
    p.add_argument("--only", metavar="GROUPS", help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--reps", type=int, help="override the number of measured rounds")
    p.add_argument("--lead-in", type=float, metavar="S", help="seconds each short generation and forward case runs "
                   "untimed right before its timed run (default 0.2; 0: time calls that follow an idle pause)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy model, for the tests
    args = p.parse_args(argv)
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            p.error(f"{flag} {path}: directory {parent} does not exist")
        if os.path.isdir(path):
            p.error(f"{flag} {path}: is a directory")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        p.error(f"--plot {args.plot}: the chart is a PNG, give a .png path")
    if args.weights is not None and not os.path.isfile(args.weights):
        p.error(f"--weights {args.weights}: no such file")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.lead_in is not None and not 0 <= args.lead_in <= 10:
        p.error(f"--lead-in {args.lead_in:g}: give seconds between 0 and 10")
    return p, args


def _suite(args, parser):
    from benchmarks.settings import FULL, QUICK, TINY

    suite = TINY if args.tiny else QUICK if args.quick else FULL
    changes = {}
    if args.only:
        changes["groups"] = tuple(g.strip() for g in args.only.split(",") if g.strip())
    if args.reps:
        changes["reps"] = args.reps
    if args.lead_in is not None:
        changes["lead_in_s"] = args.lead_in
    try:
        return suite.replace(**changes)
    except ValueError as e:
        parser.error(str(e))


def _setup_device(device: str) -> str:
    """Pins jax's platform before jax is imported; returns the torch device string."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks: error: --device gpu but torch sees no CUDA device")
    import jax

    if jax.default_backend() != "gpu":
        raise SystemExit(f"benchmarks: error: --device gpu but jax's backend is {jax.default_backend()}")
    # Both frameworks multiply float32 in float32 there too (no TF32 passes): the CPU's numerics,
    # so parity stays 1e-5-class and neither side is faster for dropping precision.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda"


def _flops_summary(config) -> dict:
    from benchmarks import roofline

    c = config.context_length
    return {
        "formula": "cached step L(W + 4(p+1)D) + 2DV; window step L(C W + 2C(C+1)D) + 2DV; "
                   "W = 24D^2 (drake) / 22D^2 (learning); see benchmarks/roofline.py",
        "cached_step_first": roofline.flops_cached_step(config, 0),
        "cached_step_last": roofline.flops_cached_step(config, c - 1),
        "window_step": roofline.flops_window_step(config),
        "summary": f"{roofline.flops_cached_step(config, 0) / 1e6:.2f}-{roofline.flops_cached_step(config, c - 1) / 1e6:.2f}"
                   f" MFLOP per character while the context grows (cached), "
                   f"{roofline.flops_window_step(config) / 1e9:.3f} GFLOP per character once the window is full "
                   f"(exact), weights read per step {roofline.weight_bytes(config) / 1e6:.1f} MB",
    }


def _notes(suite, torch_threads, load_start, load_end, rows, host_memory_reuse: bool = False,
           ratios: dict | None = None) -> list[str]:
    from benchmarks import harness

    compiled = [r for r in rows if "compiled" in r.get("impl", "") and "first_run_s" in r]
    notes = [
        f"{suite.reps} measured rounds per group after {suite.warmup} warm-up round(s), which are excluded: they pay "
        "for jax compilation and torch.compile. Eager torch warm-ups are shortened (notebook loop: 2 steps; tuned: "
        "up to the first window step).",
        "Within a group every case runs once per round, in an order rotated each round, so background load falls "
        "on all sides alike; per-round ratios (min-max) show how stable each ratio is.",
        "Before each run the harness waits until the process's threads are idle (ONNX Runtime's keep spinning "
        "after a call), so that no case shares the cores with the previous case's threads."
        + (f" In the generation and forward groups every case shorter than {harness.LEAD_IN_MAX_CASE_S:g} s then "
           f"runs untimed for {suite.lead_in_s:g} s right before its timed run: on this VM a core left idle for a "
           "fraction of a second runs the next few tens of milliseconds of work slower, which would otherwise "
           "bill short cases for the pause before them (ONNX Runtime's spinning threads hide it from themselves)."
           if suite.lead_in_s > 0 else " Short cases are timed right after that pause (no lead-in)."),
        f"torch intra-op threads: {torch_threads} by default; every torch implementation (the notebook's too) "
        "runs at the thread count a short probe finds fastest for it on this machine (median of 3 timed runs per "
        "count; figures below; the "
        "thread count is in each row's name or 'threads'); the tuned forward runs at every count. jaxgpt runs "
        "at XLA's defaults (its CPU thread pool is not tuned).",
        f"Machine load average (1 min) at start {load_start:.2f}, at end {load_end:.2f}: other processes were "
        "running; absolute figures move with them, ratios much less.",
        "All implementations use the same weights (one weights.pt): the notebook model, the tuned torch model "
        "(checked against it to 1e-5) and jaxgpt (ported with porting.load_weights).",
        "Time to first character: torch loops, the moment the first token exists inside a full run; jaxgpt, a "
        "warm generate_tokens(num_new=1) call (prompt prefill, one step, host transfer).",
        "Generation starts from the notebook's seed context [[0]]; exact = the notebook's semantics; strided = "
        f"jaxgpt's opt-in mode (stride {suite.stride or 'C // 2'}), compared with the torch twin of the same "
        "algorithm and, for the 5000-character ratio, with the notebook loop.",
        "The notebook loop's long runs are extrapolated from its measured runs (constant cost per character once "
        "the window is full); such rows are marked extrapolated.",
    ]
    seen = set()
    for r in rows:
        kind = "torch tuned" if "tuned" in r["impl"] else r["impl"].split(",")[0]
        key = (r["name"].split(" ")[0], kind, r["batch"])
        if "thread_probe" not in r or key in seen:
            continue
        seen.add(key)
        figures = "; ".join(f"{n} thread(s): " + ", ".join(f"{k[:-2]} {1e3 * t:.2f} ms" for k, t in v.items())
                            for n, v in r["thread_probe"].items())
        notes.append(f"Thread probe, {key[0]} batch {key[2]}, {key[1]}: {figures}.")
    for r in rows:
        if "thread_medians_s" in r:
            medians = "; ".join(f"{n} thread(s) {t:.3f} s" for n, t in r["thread_medians_s"].items())
            notes.append(f"{r['name']}, the notebook model's step at each thread count, cases of the same interleaved "
                         f"rounds (median): {medians}; the fastest is the ratio's baseline.")
    if compiled:
        firsts = ", ".join(f"{r['name']}: {r['first_run_s']:.0f} s" for r in compiled)
        notes.append(f"torch.compile (inductor, static shapes) first runs including compilation: {firsts}.")
    for key, r in (ratios or {}).items():
        if "matmul_floor" in r:
            fl = r["matmul_floor"]
            batch = key.removeprefix("train_step_b")
            size = f" ({batch} x {suite.model.context_length})" if batch != key else ""
            notes.append(f"Training step{size}: {r.get('warmup', 1)} discarded rounds (benchmarks/train_step.py "
                         "WARMUP: the two frameworks share one heap, which settles after a few rounds); its matrix "
                         f"products alone (benchmarks/matmul_floor.py, {fl['gflop']:.1f} GFLOP) "
                         f"take {fl['seconds']:.3f} s in jax ({fl['gflop_per_s']:.0f} GFLOP/s); the jaxgpt step is "
                         f"{fl['jaxgpt_step_over_floor']:.2f}x that, and no step on these kernels could beat torch's by "
                         f"more than {fl['best_possible_ratio']:.2f}x here.")
    notes.append("Host memory reuse (jaxgpt.host_memory, as in the jaxgpt CLI): "
                 + ("on for this process, both frameworks: glibc keeps freed memory, so XLA:CPU's per-call scratch "
                    "buffer is not page-faulted afresh on every call." if host_memory_reuse else
                    "off (not Linux/glibc, or JAX had started): XLA:CPU's scratch buffers are mapped afresh per call."))
    return notes


def main(argv=None) -> int:
    from jaxgpt.host_memory import reuse_host_memory

    host_memory_reuse = reuse_host_memory()  # as the jaxgpt CLI does; before JAX starts
    parser, args = _parse(argv)
    suite = _suite(args, parser)
    torch_device = _setup_device(args.device)
    import tempfile

    import torch

    from benchmarks import harness, report, roofline
    from benchmarks.models import build_models, default_weights

    began = time.perf_counter()
    load_start = os.getloadavg()[0]

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", file=sys.stderr, flush=True)

    rows, ratios, parity, limits = [], {}, {}, None
    with tempfile.TemporaryDirectory(prefix="jaxgpt-bench-") as workdir:
        weights = args.weights or (None if args.tiny else default_weights())
        progress(f"building models ({weights or 'random weights'})")
        models = build_models(suite.model, workdir, weights, torch_device, onnx=suite.onnx and torch_device == "cpu")
        measure = lambda: roofline.measure_limits(suite.limits_matmul, suite.limits_mbytes, torch_device=torch_device)
        if "limits" in suite.groups:
            progress("device limits")
            limits = measure()
        for group in ("generation", "forward", "train", "porting", "compile", "beam_score", "requests"):
            if group in suite.groups:
                progress(f"--- {group}")
                module = __import__(f"benchmarks.{_MODULES[group]}", fromlist=["run"])
                new_rows, new_ratios = module.run(models, suite, limits, progress)
                rows += new_rows
                ratios.update(new_ratios)
        if "parity" in suite.groups:
            progress("--- parity")
            from benchmarks import parity as parity_module

            parity = parity_module.run(models, suite, limits, progress)
        parity.setdefault("weights", models.weights_source)
        if "limits" in suite.groups:  # once more at the end: the peak is the better of the two
            progress("device limits (again)")
            limits = roofline.merge_limits(limits, measure())
            for row in rows:
                roofline.apply_floors(row, limits)
    cfg = models.config
    doc = {
        "device": harness.device_description(),
        "versions": harness.versions("optax", "torch", "onnxruntime"),
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": {"description": f"{cfg.variant}, {cfg.num_params():,} parameters (V {cfg.vocab_size}, "
                                 f"C {cfg.context_length}, D {cfg.model_dim}, L {cfg.num_blocks}, H {cfg.num_heads})",
                  "num_params": cfg.num_params()},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                    "host_memory_reuse": host_memory_reuse},
        "settings": {k: v for k, v in vars(suite).items() if k != "model"},
        "limits": limits.as_dict() if limits is not None else None,
        "flops_per_char": _flops_summary(cfg),
        "results": rows,
        "ratios": ratios,
        "parity": parity,
        "elapsed_s": time.perf_counter() - began,
    }
    doc["notes"] = _notes(suite, torch.get_num_threads(), load_start, os.getloadavg()[0], rows, host_memory_reuse,
                          ratios)
    if models.ort is not None:
        import onnxruntime

        doc["notes"].append(
            f"ONNX Runtime {onnxruntime.__version__}: the notebook model exported with torch.onnx.export (opset "
            "17, batch and length dynamic), CPU execution provider, every graph optimisation (ORT_ENABLE_ALL), one "
            f"session per intra-op thread count ({', '.join(map(str, models.ort.threads))}; each generation group "
            "keeps the counts its probe finds within 2x of the best, the forward runs at every count; the fastest "
            f"median counts); its logits differ from the notebook model's by {models.ort_max_diff:.2e} at most.")
    elif suite.onnx and torch_device == "cpu":
        doc["notes"].append("ONNX Runtime left out: onnx/onnxruntime are not installed (pip install -e \".[onnx]\").")
    if torch_device == "cuda":
        doc["notes"].append("GPU: float32 matrix products in full float32 on both sides (jax_default_matmul_precision "
                            "'highest', torch TF32 off), as on the CPU.")
    report.check_document(doc)
    if args.json:
        report.write_json(doc, args.json)
    if args.markdown:
        report.write_markdown(doc, args.markdown)
    if args.plot:
        report.plot(doc, args.plot)
    print(report.markdown(doc))
    return 0


_MODULES = {"beam_score": "beam_score", "requests": "requests_bench", "generation": "generation", "forward": "forward", "train": "train_step", "porting": "porting_bench",
            "compile": "compile_bench"}

if __name__ == "__main__":
    sys.exit(main())
