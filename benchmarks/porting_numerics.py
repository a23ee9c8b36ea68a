"""Float32 accuracy and speed of `jaxgpt.ops.project`'s contraction split, interleaved.

    python -m benchmarks.porting_numerics [--rounds 15] [--batch 64] [--skip-errors]

Variants of the projections' forward (the gradient is `ops`' own in all of them):
  shipped             `ops.project` as the model calls it: the query/key/value product summed
                      in `model.QKV_PARTS` parts, except in a decode step (one position per row);
  one chain           every product in one float32 chain (as before);
  qkv in 4, decode too  the shipped split in decode steps as well;
  all in 4 / 2 / <= 64  every projection split (4 parts, 2 parts, parts of at most 64 terms).
Errors: logits (and the final norm) of each variant against the torch reference in float64 on
`--batch` windows of data/shakespeare.txt, next to torch float32's own error. Speed: the model's
forward at (1, 128), (8, 128), (64, 128), one decode step at batch 1 and 32 (cache filled to
position 64) and a training step at (16, 128), every variant compiled in this process (the
module's `project` swapped while it is traced) and timed in interleaved rounds; per-round
time ratios against "one chain" (above 1: the variant is slower). Results:
benchmarks/results/parity_numerics.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np

WEIGHTS = "jaxgpt/assets/default_weights.pt"
TEXT = "data/shakespeare.txt"


def variants(names=None) -> dict:
    """name -> a `project(x, kernel, parts=1)` with `ops.project`'s gradient."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxgpt import ops

    def make(forward):  # forward(x, kernel, parts)
        fn = jax.custom_vjp(forward, nondiff_argnums=(2,))
        fn.defvjp(lambda x, k, parts: (fn(x, k, parts), (x, k)), ops._project_bwd)
        return lambda x, k, parts=1: fn(x, k, parts)

    def one(x, k):
        return jnp.einsum("...i,io->...o", x, k)

    every = {
        "shipped": ops.project,
        "one chain": make(lambda x, k, parts: one(x, k)),
        "qkv in 4, decode too": make(lambda x, k, parts: ops.contract_in_parts(x, k, parts) if parts > 1 else one(x, k)),
        "all in 4": make(lambda x, k, parts: ops.contract_in_parts(x, k, 4)),
        "all in 2": make(lambda x, k, parts: ops.contract_in_parts(x, k, 2)),
        "all in <= 64": make(lambda x, k, parts: ops.contract_in_parts(x, k, -(-k.shape[0] // 64))),
    }
    return {k: v for k, v in every.items() if names is None or k in names or k in ("shipped", "one chain")}


def _use(project) -> None:
    import jaxgpt.model

    jaxgpt.model.project = project


def errors(model_variants: dict, batch: int) -> dict:
    """name -> {"logits": (max, mean), "final_norm": (max, mean)} against torch float64, torch float32 included."""
    import torch

    import porting
    from jaxgpt.cli import load_vocab
    from porting import keymap, parity
    from porting.torch_reference import reference_from_config

    checkpoint = porting.read_checkpoint(WEIGHTS)
    config = checkpoint.config
    vocab, _ = load_vocab(None, WEIGHTS)
    with open(TEXT, encoding="utf-8") as f:
        tokens = parity.text_windows(vocab.encode(f.read()), batch, config.context_length)
    state = {k: torch.from_numpy(v) for k, v in keymap.state_dict_from_params(checkpoint.params, config).items()}
    torch.set_num_threads(1)
    runs = {}
    for dtype in ("float64", "float32"):
        reference = reference_from_config(config)
        reference = reference.double() if dtype == "float64" else reference
        reference.load_state_dict(state, strict=True)
        reference.eval()
        runs[dtype] = parity.torch_layers(reference, tokens)
    truth = runs.pop("float64")
    runs = {"torch float32": runs["float32"]}
    for name, project in model_variants.items():
        _use(project)
        runs[name] = parity.jax_layers(porting.load_weights(WEIGHTS))(tokens)
    _use(model_variants["shipped"])

    def err(a, b):
        d = np.abs(np.asarray(a, np.float64) - b)
        return float(d.max()), float(d.mean())

    return {name: {"logits": err(out[-1], truth[-1]), "final_norm": err(out[-2], truth[-2])} for name, out in runs.items()}


def _cases(model, project, only=()) -> dict:
    """Case name -> a compiled no-argument call of the model with `project` traced in."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.train_step import _JaxStep, _batch, _train_config
    from jaxgpt.model import init_cache

    _use(project)
    graphdef, state = nnx.split(model)
    cfg = model.config
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    decode = jax.jit(lambda st, x, cache, pos: nnx.merge(graphdef, st).decode(x, cache, pos))
    cases = {}
    for b in (1, 8, 64):
        tokens = jnp.asarray(np.random.default_rng(b).integers(0, cfg.vocab_size, (b, cfg.context_length)), jnp.int32)
        cases[f"forward ({b}, 128)"] = lambda tokens=tokens: forward(state, tokens)
    for b in (1, 32):
        cache = jax.block_until_ready(init_cache(cfg, b))
        tokens, pos = jnp.zeros((b, 1), jnp.int32), jnp.full((b,), 64, jnp.int32)
        cases[f"decode step, batch {b}"] = lambda tokens=tokens, cache=cache, pos=pos: decode(state, tokens, cache, pos)
    step = _JaxStep(model, _train_config(16))
    x, y = _batch(cfg, 16)
    cases["train step (16, 128)"] = lambda: step(x, y)
    if only:
        cases = {k: v for k, v in cases.items() if any(c in k for c in only)}
    for call in cases.values():
        jax.block_until_ready(call())  # traced now, with this `project`
    return cases


def speed(model_variants: dict, rounds: int, only=(), target_s: float = 0.05) -> dict:
    """case -> variant -> {"wall": [...], "cpu": [...]} seconds per call, one per round (each round
    calls every (case, variant) `repeats` times, the order rotated by round; "cpu" is the
    process's CPU time, all threads)."""
    import jax

    import porting

    model = porting.load_weights(WEIGHTS)
    compiled = {name: _cases(model, project, only) for name, project in model_variants.items()}
    _use(model_variants["shipped"])
    first = next(iter(compiled.values()))
    repeats = {}
    for case, call in first.items():  # enough calls per sample for ~target_s
        begin = time.perf_counter()
        jax.block_until_ready(call())
        repeats[case] = max(1, round(target_s / max(time.perf_counter() - begin, 1e-6)))
    pairs = [(case, name) for case in first for name in compiled]
    out = {case: {name: {"wall": [], "cpu": []} for name in compiled} for case in first}
    for r in range(rounds + 1):  # round 0 is a warm-up
        shift = r % len(pairs)
        for case, name in pairs[shift:] + pairs[:shift]:
            call = compiled[name][case]
            gc.collect()
            gc.disable()
            begin, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats[case]):
                result = call()
            jax.block_until_ready(result)
            wall, cpu = time.perf_counter() - begin, time.process_time() - cpu
            gc.enable()
            if r:
                out[case][name]["wall"].append(wall / repeats[case])
                out[case][name]["cpu"].append(cpu / repeats[case])
    return out


def _table(measured: dict, key: str) -> list[str]:
    lines = []
    for case, by_name in measured.items():
        base = by_name["one chain"][key]
        cells = []
        for name, times in by_name.items():
            cell = f"{name} {1e3 * statistics.median(times[key]):.2f}"
            if name != "one chain":
                ratios = sorted(t / b for t, b in zip(times[key], base))
                q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 2 else (ratios[0], 0, ratios[-1])
                cell += f" ({statistics.median(ratios):.3f}, IQR {q1:.2f}-{q3:.2f}, {ratios[0]:.2f}-{ratios[-1]:.2f})"
            cells.append(cell)
        lines.append(f"  {case:22s} " + "; ".join(cells))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64, help="text windows for the errors")
    parser.add_argument("--skip-errors", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--cases", default="", help="comma-separated substrings of the case names to time")
    parser.add_argument("--variants", default="", help="semicolon-separated variant names besides shipped and one chain")
    args = parser.parse_args(argv)
    chosen = variants(args.variants.split(";") if args.variants else None)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if not args.skip_errors:
        print(f"\nlogits (final norm) against torch float64, {args.batch} windows:")
        for name, e in errors(chosen, args.batch).items():
            print(f"  {name:14s} max {e['logits'][0]:.3g} mean {e['logits'][1]:.3g}"
                  f"   (final norm max {e['final_norm'][0]:.3g} mean {e['final_norm'][1]:.3g})", flush=True)
    if not args.skip_speed:
        measured = speed(chosen, args.rounds, [c for c in args.cases.split(",") if c])
        for key in ("wall", "cpu"):
            print(f"\n{key} ms per call (median), and per-round ratio variant / one chain "
                  f"(median, IQR, min-max; above 1: slower), {args.rounds} rounds")
            print("\n".join(_table(measured, key)), flush=True)
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
