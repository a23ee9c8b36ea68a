"""One training step, jaxgpt against the notebook's torch model, same batch, same weights.

Both sides do the whole step: forward with dropout 0.2, cross-entropy, backward, global-norm
gradient clipping (1.0) and AdamW (betas 0.9/0.99, weight decay 0.1 on matrices and
embeddings only, the warmup + cosine learning rate), starting from identical weights on the
same (B, T) batch. jaxgpt runs `jaxgpt.train.make_train_step` (one compiled program, params
and optimizer state donated; the clock stops after `block_until_ready`); torch runs the
notebook's `DrakeGPT` (`porting.torch_reference`) with `torch.optim.AdamW` and
`clip_grad_norm_` at torch's default thread count. The two cases alternate, in an order
rotated each round, so machine noise falls on both alike; the first round (compilation,
allocator warm-up) is discarded.

Correctness is shown on the same batch with dropout off: the first-step loss, every gradient
(torch's mapped to the Flax layout by porting's key table) and the parameters after one full
optimizer step must agree.

    python -m benchmarks.train_step [--quick] [--batch B] [--reps N] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks.harness import cpu_description, interleave, paired_ratio, stats_of, timed, versions
from jaxgpt.atomic import write_text

GRAD_TOLERANCE = 1e-5  # max |gradient difference| from identical weights, dropout off
MAX_BATCH_TRIES = 8  # check batches tried before giving up on one without ReLU ties
# Discarded rounds. Both frameworks allocate from one glibc heap (jaxgpt.host_memory): torch's
# tensors land in the memory XLA's scratch buffer had, which then grows the heap onto fresh
# pages (page faults, ~10 us each here) for a few rounds until the heap holds both patterns.
# A training run without torch in the process settles after its first step.
WARMUP = 3


def _train_config(batch: int, steps: int = 5000):
    from jaxgpt.train import TrainConfig

    # The defaults of `jaxgpt train`; no warmup so that the first step already moves the weights.
    return TrainConfig(steps=steps, batch_size=batch, warmup_steps=0)


def _batch(config, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, config.context_length + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _flat(tree) -> dict[str, np.ndarray]:
    from flax import nnx

    return {".".join(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(tree)}


class _TorchStep:
    """The notebook model's training step: zero_grad, forward, loss, backward, clip, AdamW."""

    def __init__(self, model, tc, lrs):
        import torch

        self.torch, self.model, self.lrs, self.clip = torch, model, lrs, tc.grad_clip
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=1e-8)
        self.count = 0

    def __call__(self, x, y) -> float:
        F = self.torch.nn.functional
        for group in self.opt.param_groups:
            group["lr"] = self.lrs[self.count % len(self.lrs)]
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.count += 1
        return loss.item()


class _JaxStep:
    """`jaxgpt.train.make_train_step` with its own copy of the parameters (they are donated)."""

    def __init__(self, model, tc, train: bool = True, seed: int = 0):
        import jax
        import jax.numpy as jnp

        from jaxgpt.train import make_optimizer, make_train_step, split_modes

        self.jax = jax
        train_def, eval_def, params = split_modes(model)
        self.tx = make_optimizer(tc)
        self.params = jax.tree.map(jnp.copy, params)
        self.opt_state = self.tx.init(self.params)
        self.step = make_train_step(train_def if train else eval_def, self.tx,
                                    tokens=tc.batch_size * model.config.context_length)
        self.key = jax.random.key(seed)
        self.count = 0

    def __call__(self, x, y):
        self.params, self.opt_state, loss, _ = self.step(self.params, self.opt_state, x, y,
                                                         self.jax.random.fold_in(self.key, self.count))
        self.count += 1
        return loss.block_until_ready()


def relu_ties(reference, x) -> int:
    """ReLU inputs whose sign float32 rounding decides: float32 and float64 forward passes of the
    torch model `reference` on int tokens `x` `(B, T)` disagree on them."""
    import copy

    import torch

    signs = []
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(reference).to(dtype).eval()
        captured = []
        hooks = [m.register_forward_hook(lambda mod, inputs, out: captured.append(inputs[0] > 0))
                 for m in model.modules() if isinstance(m, torch.nn.ReLU)]
        with torch.no_grad():
            model(torch.from_numpy(x.astype(np.int64)))
        for h in hooks:
            h.remove()
        signs.append(captured)
    return int(sum(int((a != b).sum()) for a, b in zip(*signs)))


def agreement(model, batch: int = 8, seed: int = 0) -> dict:
    """First-step loss, gradients and updated weights of both frameworks, dropout off.

    Args:
      model: a `jaxgpt.GPT` (the shared starting weights; not modified).
      batch: rows of the check batch.

    The check batch is the first (from seed + 1 on) in which no ReLU input lies within float32
    rounding of zero (`relu_ties`): at such a tie the gradient jumps, and which side float32
    lands on is chance (a random published-size model hits one in about half of the batches
    of 8). Skipped batches are listed in the result.

    Returns:
      {"batch_seed", "batches_skipped_for_relu_ties", "loss_jax", "loss_torch", "loss_abs_diff", "grad_max_abs_diff", "grad_max_abs",
       "grad_worst_param", "params_after_step_max_abs_diff" (all weights),
       "params_after_step_max_abs_diff_grad_ge_1e-6" (weights whose gradient is >= 1e-6),
       "learning_rate", "grad_tolerance", "ok" (loss and gradients within 1e-5)}.
    """
    import jax
    import torch
    import torch.nn.functional as F
    from flax import nnx

    import porting
    from porting.torch_reference import reference_from_model
    from jaxgpt.train import cross_entropy, split_modes

    config = model.config
    tc = _train_config(batch)
    reference = reference_from_model(model)
    # A ReLU input within float32 rounding of zero makes the gradient discontinuous there:
    # rounding, not the implementation, decides whether it flows. Such batches are skipped.
    skipped = []
    for candidate in range(seed + 1, seed + 1 + MAX_BATCH_TRIES):
        x, y = _batch(config, batch, candidate)
        ties = relu_ties(reference, x)
        if not ties:
            break
        skipped.append({"seed": candidate, "relu_ties": ties})
    # jax: value and gradient of the eval-mode (dropout off) loss
    _, eval_def, params = split_modes(model)
    loss_j, grads_j = jax.jit(jax.value_and_grad(lambda p: cross_entropy(nnx.merge(eval_def, p)(x), y)))(params)
    grads_j = _flat(grads_j)
    # torch: the notebook's model from the same weights, eval mode
    xt, yt = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
    logits = reference(xt)
    loss_t = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yt.reshape(-1))
    loss_t.backward()
    grads_t = porting.params_from_state_dict({k: p.grad.numpy() for k, p in reference.named_parameters()}, config)
    diffs = {k: float(np.abs(grads_j[k] - grads_t[k]).max()) for k in grads_j}
    worst = max(diffs, key=diffs.get)
    # one full step each (clip + AdamW), dropout off, then compare the weights
    jax_step = _JaxStep(model, tc, train=False, seed=seed)
    jax_step(x, y)
    after_j = _flat(jax_step.params)
    reference.zero_grad(set_to_none=True)
    _TorchStep(reference, tc, [tc.learning_rate])(xt, yt)
    after_t = porting.params_from_state_dict({k: v.detach().numpy() for k, v in reference.state_dict().items()},
                                             config)
    params_diff = max(float(np.abs(after_j[k] - after_t[k]).max()) for k in after_j)
    # Adam moves a weight by lr * g / (|g| + eps): where |g| is near eps (1e-8) that ratio turns
    # float noise in g into differences of a fraction of lr; elsewhere the steps must agree closely.
    settled = max(float(np.abs(after_j[k] - after_t[k])[np.abs(grads_t[k]) >= 1e-6].max(initial=0.0)) for k in after_j)
    grad_diff = diffs[worst]
    loss_j, loss_t = float(loss_j), loss_t.item()
    return {
        "batch": batch,
        "batch_seed": candidate,
        "batches_skipped_for_relu_ties": skipped,
        "loss_jax": loss_j,
        "loss_torch": loss_t,
        "loss_abs_diff": abs(loss_j - loss_t),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": max(float(np.abs(g).max()) for g in grads_t.values()),
        "grad_worst_param": worst,
        "params_after_step_max_abs_diff": params_diff,
        "params_after_step_max_abs_diff_grad_ge_1e-6": settled,
        "learning_rate": tc.learning_rate,
        "grad_tolerance": GRAD_TOLERANCE,
        "ok": bool(grad_diff <= GRAD_TOLERANCE and abs(loss_j - loss_t) <= 1e-5),
    }


def torch_name(threads: int | None) -> str:
    """The case name of the torch step at an intra-op thread count (None: torch's current one)."""
    return "torch" if threads is None else f"torch, {threads} thread{'s' if threads > 1 else ''}"


def speed_cases(model, batch: int, seed: int = 0, torch_device: str = "cpu", torch_threads=None) -> dict:
    """{"torch": case, "jaxgpt": case, "jax matmuls only": case}: one training step each (dropout
    on), same batch and weights, torch on `torch_device`; and the step's matrix products alone
    (`benchmarks.matmul_floor`). With `torch_threads` (intra-op thread counts) the torch step is
    one case per count instead, named by `torch_name`."""
    import jax
    import torch

    from benchmarks import matmul_floor
    from porting.torch_reference import reference_from_model
    from jaxgpt.train import make_schedule

    config = model.config
    tc = _train_config(batch)
    x, y = _batch(config, batch, seed)
    schedule = make_schedule(tc)
    lrs = [float(schedule(i)) for i in range(64)]
    jax_step = _JaxStep(model, tc, train=True, seed=seed)
    reference = reference_from_model(model).train().to(torch_device)
    torch_step = _TorchStep(reference, tc, lrs)
    xt, yt = (torch.from_numpy(a.astype(np.int64)).to(torch_device) for a in (x, y))

    def torch_case(warm):
        return timed(lambda: torch_step(xt, yt))

    def jax_case(warm):
        return timed(lambda: jax_step(x, y))  # waits for the device

    products, operands = matmul_floor.matmuls_program(config, batch, seed)

    def floor_case(warm):
        return timed(lambda: jax.block_until_ready(products(*operands)))

    def torch_at(n):
        from benchmarks.threads import torch_threads as threads

        def case(warm):
            with threads(n):
                return torch_case(warm)

        return case

    torch_cases = ({"torch": torch_case} if torch_threads is None else
                   {torch_name(n): torch_at(n) for n in torch_threads})
    return {**torch_cases, "jaxgpt": jax_case, "jax matmuls only": floor_case}


def measure(model=None, batch: int = 64, reps: int = 5, warmup: int = WARMUP, check_batch: int = 8, progress=None,
            torch_device: str = "cpu", torch_threads=None) -> dict:
    """Times both training steps (interleaved) and checks their agreement.

    Args:
      model: starting weights (`jaxgpt.GPT`); default seeded random weights of the published config.
      batch: rows of the timed batch (T = context_length).
      reps, warmup: measured and discarded rounds (see `WARMUP`).
      check_batch: rows of the agreement batch.
      progress: optional callback given a short description before each run.
      torch_device: where the torch step runs (the agreement check runs on the CPU).
      torch_threads: intra-op thread counts at which the torch step runs, each a case of the
        same interleaved rounds; the fastest median is "torch" (default: torch's current count).

    Returns:
      A JSON-ready dict: config, batch, per-framework statistics, ratio (torch / jax median
      time) with per-round ratios, tokens/s, agreement, machine facts; with `torch_threads`,
      also "torch_threads" (the count "torch" ran at) and "torch_medians" {count: median s}.
    """
    import jax
    import torch
    from flax import nnx

    from benchmarks import matmul_floor
    from jaxgpt.config import PUBLISHED
    from jaxgpt.model import GPT

    model = model if model is not None else GPT(PUBLISHED, rngs=nnx.Rngs(0))
    config = model.config
    load_start = os.getloadavg()[0]
    began = time.perf_counter()
    check = agreement(model, check_batch)
    measured = interleave(speed_cases(model, batch, torch_device=torch_device, torch_threads=torch_threads),
                          reps, warmup, progress)
    chosen, medians = None, None
    if torch_threads is not None:
        medians = {n: stats_of(measured[torch_name(n)].runs).median for n in torch_threads}
        chosen = min(medians, key=medians.get)
        measured = {"torch": measured[torch_name(chosen)],
                    **{k: v for k, v in measured.items() if not k.startswith("torch")}}
    tokens = batch * config.context_length
    frameworks = {}
    for name, m in measured.items():
        st = stats_of(m.runs)
        frameworks[name] = {"seconds": st.as_dict(), "tokens_per_s": tokens / st.median,
                            "first_step_s": m.warmups[0]["seconds"] if m.warmups else None,
                            "page_faults": [r["page_faults"] for r in m.runs],
                            "system_s": [r["system_s"] for r in m.runs]}
    ratio = paired_ratio(measured["torch"].runs, measured["jaxgpt"].runs)
    floor_s = frameworks["jax matmuls only"]["seconds"]["median"]
    floor = {"seconds": floor_s, "gflop": matmul_floor.flops(config, batch) / 1e9,
             "gflop_per_s": matmul_floor.flops(config, batch) / 1e9 / floor_s,
             "jaxgpt_step_over_floor": frameworks["jaxgpt"]["seconds"]["median"] / floor_s,
             "best_possible_ratio": frameworks["torch"]["seconds"]["median"] / floor_s}
    return {
        "what": f"one training step ({batch} x {config.context_length}, dropout {config.dropout}, clip + AdamW): "
                "jaxgpt vs the notebook's torch model",
        "config": {k: getattr(config, k) for k in ("vocab_size", "context_length", "model_dim", "num_blocks",
                                                   "num_heads", "variant", "dropout")},
        "num_params": config.num_params(),
        "batch": batch,
        "tokens_per_step": tokens,
        "reps": reps,
        "warmup": warmup,
        "frameworks": frameworks,
        "ratio": ratio["ratio"],
        "paired": ratio["paired"],
        "matmul_floor": floor,
        "agreement": check,
        "machine": {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch_device": torch_device, "jax_backend": jax.default_backend(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()[0]},
        "versions": versions("optax", "torch"),
        "elapsed_s": time.perf_counter() - began,
        **({"torch_threads": chosen, "torch_medians": medians} if medians is not None else {}),
    }


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """The benchmark suite's entry point (`benchmarks.__main__`): rows and ratios, one training
    step per batch of `suite.train_batches`.

    Uses the suite's jaxgpt model as the shared starting weights (the suite's torch models
    are not touched: a fresh notebook model is built from the same weights). The torch step
    runs at torch's default thread count and at each of `suite.torch_threads`, every count a
    case of the same interleaved rounds (a one-off probe misjudges a step of seconds on a busy
    machine); the fastest median is the ratio's baseline, the others are reported in its row.
    """
    import torch

    from benchmarks import roofline

    torch_threads = list(dict.fromkeys([torch.get_num_threads(), *suite.torch_threads]))

    cfg, length = models.config, models.config.context_length
    rows, ratios = [], {}
    for batch in suite.train_batches:
        result = measure(models.jax, batch=batch, reps=suite.reps, warmup=max(suite.warmup, WARMUP),
                         progress=progress, torch_device=models.torch_device, torch_threads=torch_threads)
        flops = roofline.flops_train_step(cfg, batch, length)
        for name, framework in (("torch", "torch"), ("jaxgpt", "jax")):
            f = result["frameworks"][name]
            st = f["seconds"]
            row = {"name": f"train step b{batch} t{length}", "framework": framework,
                   "impl": "notebook model" if name == "torch" else "jaxgpt", "batch": batch, "steps": length,
                   "chars": batch * length, "seconds": st["median"], "chars_per_s": f["tokens_per_s"], "spread": st,
                   "first_run_s": f["first_step_s"]}
            if name == "jaxgpt":
                row["agreement"] = result["agreement"]
            else:
                row["threads"] = result["torch_threads"]
                row["thread_medians_s"] = {str(n): t for n, t in result["torch_medians"].items()}
            rows.append(roofline.annotate(row, flops, roofline.weight_bytes(cfg), limits))
        ratios[f"train_step_b{batch}"] = {"what": result["what"], "ratio": result["ratio"], "paired": result["paired"],
                                          "agreement_ok": result["agreement"]["ok"],
                                          "matmul_floor": result["matmul_floor"], "warmup": result["warmup"]}
    return rows, ratios


def markdown(result: dict) -> str:
    """A short Markdown report of `measure`'s result."""
    c, a, m, fl = result["config"], result["agreement"], result["machine"], result["matmul_floor"]
    cpu = m.get("cpu", f"{m['cpu_count']} CPU cores")  # results recorded before the CPU was described
    lines = [
        "# Training step: jaxgpt vs the notebook's torch model",
        "",
        f"- model: {c['variant']}, {result['num_params']:,} parameters (V {c['vocab_size']}, C {c['context_length']}, "
        f"D {c['model_dim']}, L {c['num_blocks']}, H {c['num_heads']}), dropout {c['dropout']}",
        f"- batch: {result['batch']} x {c['context_length']} = {result['tokens_per_step']:,} tokens per step; "
        f"{result['reps']} interleaved rounds after {result['warmup']} discarded",
        f"- machine: {cpu}, torch threads {m['torch_threads']}, jax backend {m['jax_backend']}; "
        f"load average {m['load_average_start']:.1f} at start, {m['load_average_end']:.1f} at end; host memory "
        f"reuse (jaxgpt.host_memory) {'on' if m.get('host_memory_reuse') else 'off'}",
        f"- versions: jax {result['versions']['jax']}, torch {result['versions']['torch']}",
        "",
        "| framework | median s/step | q1 - q3 | min - max | tokens/s | first step s | page faults per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, f in result["frameworks"].items():
        s = f["seconds"]
        faults = ", ".join(f"{n:,}" for n in f["page_faults"]) if "page_faults" in f else "-"
        lines.append(f"| {name} | {s['median']:.3f} | {s['q1']:.3f} - {s['q3']:.3f} | {s['min']:.3f} - {s['max']:.3f} | "
                     f"{f['tokens_per_s']:,.0f} | {f['first_step_s']:.2f} | {faults} |")
    p = result["paired"]
    lines += [
        "",
        f"**Speed-up (torch median / jaxgpt median): {result['ratio']:.2f}x**; per-round ratios: median "
        f"{p['median']:.2f}, min {p['min']:.2f}, max {p['max']:.2f} over {p['n']} rounds. Page faults: both frameworks "
        "allocate from one glibc heap, and a round whose scratch memory lands on fresh pages pays ~10 us per fault "
        f"here; {result['warmup']} discarded rounds let the heap settle first (`WARMUP` in benchmarks/train_step.py).",
        "",
        f"The step's matrix products alone (`benchmarks/matmul_floor.py`: {fl['gflop']:.1f} GFLOP, no normalisation, "
        f"softmax, dropout, loss or optimizer) take {fl['seconds']:.3f} s in jax ({fl['gflop_per_s']:.0f} GFLOP/s): "
        f"the jaxgpt step is {fl['jaxgpt_step_over_floor']:.2f}x that, and no step built on these kernels could be "
        f"more than {fl['best_possible_ratio']:.2f}x faster than torch's on this machine.",
        "",
        f"Agreement from identical weights, dropout off (batch {a['batch']}, batch seed {a['batch_seed']}):",
        "",
        f"- first-step loss: jaxgpt {a['loss_jax']:.7f}, torch {a['loss_torch']:.7f} (|diff| {a['loss_abs_diff']:.1e})",
        f"- gradients: max |diff| {a['grad_max_abs_diff']:.2e} (largest gradient {a['grad_max_abs']:.2e}; worst "
        f"parameter {a['grad_worst_param']}); tolerance {a['grad_tolerance']:g}: {'ok' if a['ok'] else 'FAILED'}",
        *([f"- skipped check batches with a ReLU input float32 cannot tell from zero (a float32 and a float64 "
           f"forward disagree on its sign; the gradient jumps there): "
           + ", ".join(f"seed {b['seed']} ({b['relu_ties']} tie{'s' if b['relu_ties'] > 1 else ''})"
                       for b in a["batches_skipped_for_relu_ties"])] if a["batches_skipped_for_relu_ties"] else []),
        f"- weights after one clip + AdamW step (lr {a['learning_rate']:g}): max |diff| "
        f"{a['params_after_step_max_abs_diff_grad_ge_1e-6']:.2e} where |gradient| >= 1e-6, "
        f"{a['params_after_step_max_abs_diff']:.2e} over all weights (Adam moves a weight by lr * g / (|g| + 1e-8): "
        "for gradients near 1e-8 that ratio magnifies float noise in g)",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    import json

    from jaxgpt.host_memory import reuse_host_memory

    host_memory_reuse = reuse_host_memory()  # as the jaxgpt CLI does; before JAX starts

    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 16 and 3 rounds instead of 64 and 5")
    p.add_argument("--batch", type=int, help="rows per step (default 64, quick 16)")
    p.add_argument("--reps", type=int, help="measured rounds (default 5, quick 3)")
    p.add_argument("--warmup", type=int, default=WARMUP, help=f"discarded rounds (default {WARMUP})")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON here")
    p.add_argument("--markdown", metavar="OUT", help="write the Markdown report here")
    args = p.parse_args(argv)
    batch = args.batch or (16 if args.quick else 64)
    reps = args.reps or (3 if args.quick else 5)
    if batch < 1 or reps < 1 or args.warmup < 0:
        p.error("--batch and --reps must be >= 1, --warmup >= 0")
    began = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - began:6.1f}s] {msg}", file=sys.stderr, flush=True)

    result = measure(batch=batch, reps=reps, warmup=args.warmup, progress=progress)
    result["machine"]["host_memory_reuse"] = host_memory_reuse
    report = markdown(result)
    print(report)
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        write_text(args.markdown, report)
    return 0 if result["agreement"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
