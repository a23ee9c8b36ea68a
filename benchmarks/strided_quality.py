"""What strided generation costs in quality and gains in speed, per stride.

`python -m benchmarks.strided_quality [--weights PT] [--text TXT] [--targets N] [--strides 2,4,...] [--chars N]`
writes benchmarks/results/strided_quality.{json,md}.

Quality: teacher-forced next-character loss (nats) on held-out text (the last 10% of
data/shakespeare.txt, or of --text), each character predicted from the context the generation
mode would give it once the window is full:
  exact        the previous C characters at positions 0..C-1 (the notebook's loop);
  stride s     a window of C characters re-encoded every s characters: the characters at
               window positions C-s..C-1 are predicted from the previous C+1-s .. C characters
               (one forward pass of C characters serves s predictions, as in generation).
Every mode predicts the same N consecutive characters, so the loss differences are paired; the
standard error given treats the per-character differences as independent (they are not quite,
being serial), so read it as a scale. Before the window first fills both modes are the same
computation, so only this steady state is measured.

Speed: warm `generate_tokens` time for `--chars` characters at batch 1 from the notebook's seed
context, median of `--reps` runs, for exact mode and each stride; wall time and process CPU
time (on a shared machine the CPU time is the steadier figure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.harness import cpu_description
from jaxgpt.atomic import write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DATA = os.path.join(ROOT, "data", "shakespeare.txt")  # the default checkpoint's training text (data/README.md)
DEFAULT_STRIDES = (2, 4, 8, 16, 32, 64, 96, 112, 128)


def _window_losses(graphdef):
    @jax.jit
    def losses(state, inputs, targets):  # (N, C) each -> (N, C) per-position cross-entropy
        logits = nnx.merge(graphdef, state)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)

    return losses


def per_target_losses(model, tokens: np.ndarray, first: int, count: int, stride: int, batch: int = 32) -> np.ndarray:
    """Loss of predicting tokens[first : first + count] under the given windowing (stride 1 = exact).

    A window starting at b covers inputs tokens[b : b + C]; its positions C-stride..C-1 predict
    tokens[b + C + 1 - stride .. b + C]. Consecutive windows start `stride` apart.
    """
    c = model.config.context_length
    keep = c + 1 - stride
    starts = np.arange(first - keep, first + count - keep, stride)
    if starts[0] < 0:
        raise ValueError(f"first={first} leaves no room for a window of {c} before the first target")
    graphdef, state = nnx.split(model)
    losses_fn = _window_losses(graphdef)
    out = []
    for i in range(0, len(starts), batch):
        b = starts[i : i + batch]
        index = b[:, None] + np.arange(c)[None]
        padded = np.resize(index, (batch, c)) if len(b) < batch else index  # one compiled shape
        losses = np.asarray(losses_fn(state, tokens[padded], tokens[padded + 1]))[: len(b)]
        out.append(losses[:, keep - 1 :].reshape(-1))  # positions keep-1..C-1: s targets per window
    return np.concatenate(out)[:count]


def time_generation(model, num_chars: int, reps: int, **options) -> dict:
    from jaxgpt.generate import generate_tokens

    context = np.zeros((1, 0), np.int32)
    generate_tokens(model, context, num_chars, **options)  # compile and warm up
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        generate_tokens(model, context, num_chars, **options)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"seconds": statistics.median(walls), "cpu_seconds": statistics.median(cpus),
            "chars_per_s": num_chars / statistics.median(walls)}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _shown(path: str) -> str:
    """A path as results record it: relative to the repository inside it, else the file's name
    (never a machine's absolute path)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else os.path.basename(path)


def markdown(doc: dict) -> str:
    lines = [
        "# Strided generation: quality and speed per stride",
        "",
        f"Checkpoint: `{doc['checkpoint']}` ({doc['checkpoint_note']}). Held-out text: the last "
        f"{doc['held_out']['fraction']:.0%} of `{doc['held_out']['path']}`; {doc['held_out']['targets']:,} consecutive "
        f"characters predicted in every mode. Context length C = {doc['context_length']}.",
        "",
        f"Speed: {doc['speed_chars']} characters, batch 1, warm, median of {doc['reps']} runs; "
        f"machine: {doc['machine']} (load average {doc['load_average']:.1f} at the start: a shared machine, "
        "so CPU seconds are the steadier figure).",
        "",
        "| mode | context per prediction | loss (nats) | vs exact | speed (chars/s) | wall s | CPU s | speed-up (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    exact = doc["exact"]
    lines.append(f"| exact | {doc['context_length']} | {exact['loss']:.4f} | — | {exact['chars_per_s']:.1f} | "
                 f"{exact['seconds']:.2f} | {exact['cpu_seconds']:.2f} | 1.0x |")
    for row in doc["strided"]:
        lines.append(
            f"| stride {row['stride']} | {row['keep']}..{doc['context_length']} | {row['loss']:.4f} | "
            f"{row['delta']:+.4f} ± {row['delta_se']:.4f} | {row['chars_per_s']:.1f} | {row['seconds']:.2f} | "
            f"{row['cpu_seconds']:.2f} | {row['speedup_cpu']:.1f}x |")
    lines += ["", "Loss: teacher-forced, each character predicted from the context its mode gives it once the "
              "window is full (see benchmarks/strided_quality.py). ± is one standard error of the paired "
              "difference, treating characters as independent.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from jaxgpt import DEFAULT_WEIGHTS, default_vocab
    from jaxgpt.data import encode_text, read_text
    from porting import load_weights

    p = argparse.ArgumentParser(prog="python -m benchmarks.strided_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: the bundled default checkpoint)")
    p.add_argument("--text", default=DATA, help="the text whose last 10%% is held out (default: data/shakespeare.txt)")
    p.add_argument("--targets", type=int, default=4096, help="held-out characters predicted per mode")
    p.add_argument("--strides", default=",".join(map(str, DEFAULT_STRIDES)))
    p.add_argument("--chars", type=int, default=2000, help="characters generated for the speed figures")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=RESULTS, help="directory for strided_quality.{json,md}")
    args = p.parse_args(argv)

    weights = args.weights or DEFAULT_WEIGHTS
    if not os.path.exists(weights):
        p.error(f"{weights}: no such checkpoint (train or pass --weights)")
    model = load_weights(weights)
    c = model.config.context_length
    strides = [int(s) for s in args.strides.split(",")]
    if not os.path.isfile(args.text):
        p.error(f"--text {args.text}: no such file")
    text = read_text(args.text)
    held_out = encode_text(text[int(len(text) * 0.9):], default_vocab(), drop_unknown=True)
    first = c  # the first target with a full window behind it, for every stride
    load = os.getloadavg()[0]
    print(f"checkpoint {weights}; {len(held_out):,} held-out characters; {args.targets} targets", file=sys.stderr)

    exact_losses = per_target_losses(model, held_out, first, args.targets, 1)
    exact = {"loss": float(exact_losses.mean()), **time_generation(model, args.chars, args.reps)}
    print(f"exact: loss {exact['loss']:.4f}, {exact['chars_per_s']:.1f} chars/s", file=sys.stderr)
    rows = []
    for s in strides:
        losses = per_target_losses(model, held_out, first, args.targets, s)
        diff = losses - exact_losses
        speed = time_generation(model, args.chars, args.reps, mode="strided", stride=s)
        rows.append({"stride": s, "keep": c + 1 - s, "loss": float(losses.mean()), "delta": float(diff.mean()),
                     "delta_se": float(diff.std(ddof=1) / np.sqrt(len(diff))), **speed,
                     "speedup": exact["seconds"] / speed["seconds"],
                     "speedup_cpu": exact["cpu_seconds"] / speed["cpu_seconds"]})
        print(f"stride {s}: loss {rows[-1]['loss']:.4f} ({rows[-1]['delta']:+.4f}), "
              f"{speed['chars_per_s']:.1f} chars/s", file=sys.stderr)

    trained = os.path.abspath(weights) == os.path.abspath(DEFAULT_WEIGHTS)
    doc = {
        "checkpoint": _shown(weights),
        "checkpoint_note": "the trained default checkpoint" if trained else "a checkpoint given with --weights",
        "context_length": c,
        "held_out": {"path": _shown(args.text), "sha256": _sha256(args.text),
                     "fraction": 0.1, "chars": int(len(held_out)), "targets": args.targets},
        "speed_chars": args.chars, "reps": args.reps,
        "machine": f"{cpu_description()}, jax {jax.__version__}",
        "load_average": load,
        "exact": exact,
        "strided": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "strided_quality.json"), json.dumps(doc, indent=1) + "\n")
    write_text(os.path.join(args.out, "strided_quality.md"), markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
