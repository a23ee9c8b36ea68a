"""Generation throughput on one device vs split over several: `python -m benchmarks.sharding`.

    python -m benchmarks.sharding [--json OUT] [--markdown OUT]            # simulated CPU devices
    python -m benchmarks.sharding --real [--max-batch N] [--json OUT] ...  # a GPU/TPU machine

Simulated (default): a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 sees 8 CPU "devices" that share the
machine's cores. In that one process every case (batch 64 and 256, on 1 and on 8 devices) runs
once per round, in an order rotated each round (benchmarks/harness.py), after a warm-up round
that pays for compilation; medians and spreads over the rounds. A control child without the
flag (a plain single-device process) runs the 1-device cases too. The simulated devices share
the CPU's cores, so this is no test of real scaling: it shows that the sharded program runs,
at what cost, and how the ratio moves with the batch.

Real (--real): the machine's own devices, in one child without the flag: batch 64, 128, ...
doubling up to --max-batch or until the device memory runs out (the first size that fails is
recorded), on 1 device and, when several are visible, on all of them.

Every case is `jaxgpt.generate_tokens` on the default checkpoint (published configuration),
exact mode, sampling at temperature 1, `--num-chars` (default 120) new characters per row
after the prompt "ROMEO:". 120 keeps the context within the window (6 + 120 <= 128), so every
step is a cached decode step: past the window the exact loop re-encodes 128 tokens per row and
step, which at batch 256 costs seconds per step on a CPU; --num-chars raises it.

Output: a JSON document {"benchmark", "mode", "device", "versions", "model", "settings",
"results": [{"batch", "devices", "process", "seconds" (median), "chars", "chars_per_s",
"spread", "first_run_s"}], "ratios": [...], "failed": [...], "notes"} and a Markdown table
(benchmarks/results/sharding_cpu.{json,md} for the simulated run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "ROMEO:"
_MARKER = "BENCHMARK-RESULT "


# ----------------------------------------------------------------------------- child process
def _load(weights: str | None):
    """The model to benchmark: the checkpoint, or (weights None) a seeded toy model for the tests."""
    from flax import nnx

    from jaxgpt.config import GPTConfig
    from jaxgpt.model import GPT

    if weights is None:
        return GPT(GPTConfig(context_length=32, model_dim=16, num_blocks=1, num_heads=2), rngs=nnx.Rngs(0))
    import porting

    return porting.load_weights(weights)


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def child(spec: dict) -> dict:
    """Runs the cases of `spec` in this process; returns their measurements."""
    import jax
    import numpy as np

    from benchmarks import harness
    from jaxgpt.generate import generate_tokens
    from jaxgpt.vocab import default_vocab

    model = _load(spec["weights"])
    prompt = default_vocab().encode(PROMPT)
    num_new = spec["num_chars"]

    def case(batch: int, devices: int):
        context = np.tile(prompt, (batch, 1))
        return lambda warm: harness.timed(lambda: generate_tokens(model, context, num_new, seed=0, devices=devices))

    pairs = [tuple(p) for p in spec["cases"]]
    failed, first_calls = [], {}
    if spec.get("scaling"):  # real devices: find the sizes that fit before measuring any
        fits = []
        for batch, devices in pairs:
            if any(b <= batch and d == devices for b, d, _ in failed):
                continue
            try:
                first_calls[(batch, devices)] = case(batch, devices)(True)["seconds"]  # compiles
                fits.append((batch, devices))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is expected; others re-raise
                if not _out_of_memory(e):
                    raise
                failed.append((batch, devices, " ".join(str(e).split())[:200]))
        pairs = fits
    cases = {f"{b}/{d}": case(b, d) for b, d in pairs}
    log = (lambda what: print(f"  {spec['process']}: {what}", file=sys.stderr, flush=True))
    measured = harness.interleave(cases, reps=spec["reps"], warmup=1, progress=log)
    results = []
    for (batch, devices), (name, m) in zip(pairs, measured.items()):
        row = harness.make_result(f"generate b{batch} on {devices}", "jax", "jaxgpt exact", batch, num_new, m,
                                  devices=min(devices, batch),  # generate never uses more devices than rows
                                  process=spec["process"], runs_s=[r["seconds"] for r in m.runs])
        if (batch, devices) in first_calls:
            row["first_run_s"] = first_calls[(batch, devices)]
        results.append(row)
    return {"results": results, "failed": [{"batch": b, "devices": d, "error": e} for b, d, e in failed],
            "device": harness.device_description(), "device_count": jax.device_count(),
            "versions": harness.versions(),
            "model": {"variant": model.config.variant, "params": model.num_params(),
                      "config": {k: getattr(model.config, k) for k in ("vocab_size", "context_length", "model_dim",
                                                                       "num_blocks", "num_heads")}}}


# ----------------------------------------------------------------------------- parent
def _spawn(spec: dict, simulated_devices: int | None) -> dict:
    env = dict(os.environ, JAXGPT_NO_COMPILE_CACHE="1")
    if simulated_devices is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={simulated_devices}"
        env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "benchmarks.sharding", "--child", json.dumps(spec)], env=env,
                          cwd=root, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.sharding: error: the {spec['process']} child process failed "
                         f"(exit {done.returncode})")
    line = next(line for line in done.stdout.splitlines() if line.startswith(_MARKER))
    return json.loads(line[len(_MARKER):])


def _ratios(results: list[dict], process: str) -> list[dict]:
    """Per batch: throughput on n devices / on 1 device, both measured in `process` (interleaved)."""
    from benchmarks import harness

    by = {(r["batch"], r["devices"]): r for r in results if r["process"] == process}
    out = []
    for (batch, devices), row in sorted(by.items()):
        single = by.get((batch, 1))
        if devices == 1 or single is None:
            continue
        paired = harness.summarize([a / b for a, b in zip(single["runs_s"], row["runs_s"])]).as_dict()
        out.append({"batch": batch, "devices": devices, "speedup": single["seconds"] / row["seconds"],
                    "paired": paired, "what": f"batch {batch}: {devices} devices vs 1 device, same process"})
    return out


def run(args) -> dict:
    weights = None if args.tiny else (args.weights or _default_weights())
    base = {"weights": weights, "num_chars": args.num_chars, "reps": args.reps}
    started = time.time()
    if args.real:
        spec = dict(base, process="real devices", scaling=True, cases=[])
        # The child decides the device counts it has: ask for "all" as a large number, capped there.
        batches = []
        b = args.batches[0]
        while b <= args.max_batch:
            batches.append(b)
            b *= 2
        spec["cases"] = [[b, 1] for b in batches] + [[b, -1] for b in batches]
        docs = [_spawn(spec, None)]
    else:
        cases = [[b, d] for b in args.batches for d in (1, args.devices)]
        docs = [_spawn(dict(base, process=f"{args.devices} simulated devices", cases=cases), args.devices),
                _spawn(dict(base, process="plain (1 device)", cases=[[b, 1] for b in args.batches]), None)]
    results = [r for d in docs for r in d["results"]]
    doc = {
        "benchmark": "sharding",
        "mode": "real" if args.real else "simulated",
        "device": docs[0]["device"],
        "device_count": docs[0]["device_count"],
        "versions": docs[0]["versions"],
        "model": docs[0]["model"],
        "settings": {"weights": os.path.basename(weights) if weights else "toy model (seeded)", "prompt": PROMPT,
                     "num_chars": args.num_chars, "generation": "exact mode, temperature 1, seed 0",
                     "reps": args.reps, "warmup": 1},
        "results": results,
        "ratios": _ratios(results, docs[0]["results"][0]["process"] if docs[0]["results"] else ""),
        "failed": [f for d in docs for f in d["failed"]],
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wall_s": time.time() - started,
        "notes": _notes(args),
    }
    return doc


def _notes(args) -> list[str]:
    if args.real:
        return ["Real devices: batch doubled until --max-batch or the first out-of-memory failure (listed under "
                "'failed'). 'devices' -1 in a request means all visible devices; rows show the count used."]
    return [f"{args.devices} simulated CPU devices share the machine's {os.cpu_count()} cores: they add no compute. "
            "A ratio above 1 comes from running several smaller per-device programs at once where one device's "
            "decode step leaves cores idle; below 1 it is the partitioned program's overhead.",
            "The 1-device and n-device cases ran interleaved in the same process; the plain process is a control "
            "(run afterwards, not interleaved)."]


def _default_weights() -> str:
    import jaxgpt

    if not os.path.exists(jaxgpt.DEFAULT_WEIGHTS):
        raise SystemExit("benchmarks.sharding: error: the default checkpoint is not installed: pass --weights PT")
    return jaxgpt.DEFAULT_WEIGHTS


def markdown(doc: dict) -> str:
    s = doc["settings"]
    m = doc["model"]
    lines = [
        f"# Generation split over devices ({doc['mode']})",
        "",
        f"- device: {doc['device']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- model: {m['variant']}, {m['params']:,} parameters; weights: {s['weights']}",
        f"- each row: `generate_tokens`, {s['generation']}, {s['num_chars']} new characters per row after "
        f"{s['prompt']!r}; median of {s['reps']} interleaved rounds after {s['warmup']} warm-up round",
        f"- date: {doc['date']}; wall time {doc['wall_s']:.0f} s",
        "",
        "| batch | devices | process | median s | IQR s | chars/s | first call s (compile + run) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        sp = r["spread"]
        first = f"{r['first_run_s']:.2f}" if r.get("first_run_s") is not None else "-"
        lines.append(f"| {r['batch']} | {r['devices']} | {r['process']} | {r['seconds']:.3f} | "
                     f"{sp['q3'] - sp['q1']:.3f} | {r['chars_per_s']:,.0f} | {first} |")
    if doc["ratios"]:
        lines += ["", "| comparison | throughput ratio (n devices / 1) | per-round min-max |", "| --- | ---: | ---: |"]
        for q in doc["ratios"]:
            spread = f"{q['paired']['min']:.3g}-{q['paired']['max']:.3g}"
            lines.append(f"| {q['what']} | **{q['speedup']:.3g}x** | {spread} |")
    if doc["failed"]:
        lines += ["", "Did not fit: " + "; ".join(f"batch {f['batch']} on {f['devices']} device(s)"
                                                  for f in doc["failed"])]
    lines += [""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the results document here")
    p.add_argument("--markdown", metavar="OUT", help="write a Markdown report here")
    p.add_argument("--real", action="store_true", help="the machine's own devices (GPU/TPU), batch scaling")
    p.add_argument("--batches", type=_batches, default=None,
                   help="batch sizes (simulated; default 64,256) or the first size (--real; default 64)")
    p.add_argument("--max-batch", type=int, default=65536, help="--real: largest batch tried (default 65536)")
    p.add_argument("--devices", type=int, default=8, help="simulated device count (default 8)")
    p.add_argument("--num-chars", type=int, default=120, help="new characters per row (default 120)")
    p.add_argument("--reps", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--weights", metavar="PT", help="checkpoint (default: jaxgpt.DEFAULT_WEIGHTS)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy model, for the tests
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        if spec.get("scaling"):
            import jax

            spec["cases"] = [[b, jax.device_count() if d == -1 else d] for b, d in spec["cases"]]
            spec["cases"] = [c for i, c in enumerate(spec["cases"]) if c not in spec["cases"][:i]]
        print(_MARKER + json.dumps(child(spec)), flush=True)
        return 0
    args.batches = args.batches or ([64, 256] if not args.real else [64])
    for flag, value, low in (("--devices", args.devices, 2), ("--num-chars", args.num_chars, 1),
                             ("--reps", args.reps, 1), ("--max-batch", args.max_batch, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.real and args.batches[0] > args.max_batch:
        p.error(f"--max-batch {args.max_batch} is below the first batch size {args.batches[0]}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{flag} {path}: the directory does not exist")
    from jaxgpt.atomic import write_text

    doc = run(args)
    text = markdown(doc)
    if args.json:
        write_text(args.json, json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        write_text(args.markdown, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
