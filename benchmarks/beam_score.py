"""Beam search and scoring: jaxgpt against torch doing the same work, interleaved in one run.

  beam    beams 4 (suite.beam_beams), suite.beam_steps characters (200), batch 1, from the
          seed token: `jaxgpt.beam_search` against `porting.torch_reference.reference_beam_search`
          (the notebook's re-encoding loop over all beams at once, under no_grad) on the
          reference model, at the thread count a probe finds fastest. Both must return the
          same tokens (checked on the warm-up round).
  score   `jaxgpt.score` of suite.score_chars characters (10,000) of held-out Shakespeare in
          exact mode against scoring the same windows with the tuned torch model, batched
          (`TunedGPT.window_last` on batches of the size a probe finds fastest, inference
          mode, the first window's every row from `TunedGPT.forward`); both log-probability
          vectors must agree to 1e-4. The FLOP floor is one C-token window per character past
          the first C (benchmarks.roofline.flops_window_step) plus the first window.

`python -m benchmarks --only beam_score` runs it inside the suite; `python -m benchmarks.beam_score
[--json OUT] [--markdown OUT]` alone (published configuration, default checkpoint).
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks import roofline
from benchmarks.harness import interleave, make_result, paired_ratio

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shakespeare.txt")


def _text(n: int, vocab) -> str:
    """n characters from the end of the corpus (the training recipe holds out its tail), else a repeat."""
    try:
        with open(CORPUS, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        text = "ROMEO:\nBut soft! what light through yonder window breaks?\n" * (n // 50 + 1)
    text = "".join(c for c in text[-3 * n :] if not vocab.unknown_chars(c))
    return text[-n:]


def _torch_score(tuned, tokens: np.ndarray, context_length: int, group: int):
    """Exact-mode log-probabilities of `tokens` with batched torch windows (the same windows as jaxgpt)."""
    import torch
    import torch.nn.functional as F

    c, n = context_length, len(tokens)
    stream = torch.zeros(n + 1 + c, dtype=torch.long)
    stream[1 : n + 1] = torch.from_numpy(tokens.astype(np.int64))
    out = torch.empty(n)
    with torch.inference_mode():
        first = F.log_softmax(tuned(stream[None, :c]).float(), dim=-1)[0]  # (C, V): every row of window 0
        m = min(n, c)
        out[:m] = first[torch.arange(m), stream[1 : m + 1]]
        starts = torch.arange(1, n - c + 1)
        for i in range(0, len(starts), group):
            b = starts[i : i + group]
            windows = stream[b[:, None] + torch.arange(c)[None]]
            logp = F.log_softmax(tuned.window_last(windows).float(), dim=-1)
            out[b + c - 1] = logp[torch.arange(len(b)), stream[b + c]]
    return out.numpy()


def _best_group(tuned, context_length: int, groups=(4, 8, 16, 32), windows: int = 32):
    """The torch batch size (windows per forward) fastest per window here, and each one's time."""
    import torch

    best = {}
    with torch.inference_mode():
        for g in groups:
            batch = torch.zeros((g, context_length), dtype=torch.long)
            times = []
            for _ in range(3):  # the first round warms up
                begin = time.perf_counter()
                for _ in range(max(windows // g, 1)):
                    tuned.window_last(batch)
                times.append((time.perf_counter() - begin) / max(windows // g, 1) / g)
            best[g] = min(times[1:])
    return min(best, key=best.get), best


def run(models, suite, limits=None, progress=None, score_reps: int | None = None) -> tuple[list[dict], dict]:
    """Times the beam and score cases; returns (result rows, ratios: torch time / jaxgpt time).

    Args:
      score_reps: measured rounds of the score cases (default suite.reps).
    """
    import torch

    import jaxgpt
    from benchmarks.threads import probe_threads, torch_threads
    from porting.torch_reference import reference_beam_search

    cfg = models.config
    c = cfg.context_length
    sampler = jaxgpt.Sampler(models.jax)
    beams, steps, chars = suite.beam_beams, suite.beam_steps, suite.score_chars
    seed = np.zeros((1, 1), np.int64)
    vocab = jaxgpt.default_vocab()
    text = _text(chars, vocab)
    tokens = vocab.encode(text)
    plural = lambda n: f"{n} thread{'s' if n > 1 else ''}"

    def torch_beam():
        return reference_beam_search(models.reference, torch.from_numpy(seed), steps, beams, c)[0].numpy()

    beam_threads, beam_probe = probe_threads(
        {"beam_window_step": (1, lambda: models.reference(torch.zeros((beams, c), dtype=torch.long)))},
        suite.torch_threads)
    score_threads, score_probe = probe_threads(
        {"score_batch": (1, lambda: models.tuned.window_last(torch.zeros((8, c), dtype=torch.long)))},
        suite.torch_threads)
    with torch_threads(score_threads):
        group, group_probe = _best_group(models.tuned, c)
    checks = {}

    def jax_beam(warm):
        begin = time.perf_counter()
        result = jaxgpt.beam_search(sampler, seed, steps, beams=beams, devices=1)
        seconds = time.perf_counter() - begin
        checks.setdefault("jax_beam", result.tokens)
        return {"seconds": seconds}

    def torch_beam_case(warm):
        with torch_threads(beam_threads):
            begin = time.perf_counter()
            result = torch_beam()
            seconds = time.perf_counter() - begin
        checks.setdefault("torch_beam", result)
        return {"seconds": seconds}

    def jax_score(warm):  # the warm-up compiles on a short text: the programs do not depend on length
        begin = time.perf_counter()
        logp = jaxgpt.score(sampler, text[: 2 * c] if warm else text)
        seconds = time.perf_counter() - begin
        if not warm:
            checks.setdefault("jax_score", logp)
        return {"seconds": seconds, "partial": warm}

    def torch_score(warm):
        with torch_threads(score_threads):
            begin = time.perf_counter()
            logp = _torch_score(models.tuned, tokens[: 2 * c] if warm else tokens, c, group)
            seconds = time.perf_counter() - begin
        if not warm:
            checks.setdefault("torch_score", logp)
        return {"seconds": seconds, "partial": warm}

    torch_beam_name = f"torch reference beam search, {plural(beam_threads)}"
    torch_score_name = f"torch tuned batched windows ({group} per batch), {plural(score_threads)}"
    # Two groups: a round of scoring costs minutes on a small CPU, one of beam search seconds.
    measured = interleave({"jaxgpt beam_search": jax_beam, torch_beam_name: torch_beam_case},
                          suite.reps, suite.warmup, progress)
    measured |= interleave({"jaxgpt score": jax_score, torch_score_name: torch_score},
                           score_reps or suite.reps, suite.warmup, progress)
    same_tokens = bool(np.array_equal(checks["jax_beam"], checks["torch_beam"]))
    score_diff = float(np.abs(checks["jax_score"] - checks["torch_score"]).max())
    if not same_tokens:
        raise AssertionError("beam search: jaxgpt and the torch reference returned different tokens")
    if not score_diff <= 1e-4:
        raise AssertionError(f"score: jaxgpt and torch differ by {score_diff:.3g} > 1e-4")

    score_flops = roofline.flops_forward(cfg, 1, c) + max(len(tokens) - c, 0) * roofline.flops_window_step(cfg)
    rows = []
    for impl, m in measured.items():
        is_beam = "beam" in impl
        row = make_result(f"beam b1 x{beams} {steps}" if is_beam else f"score {len(tokens)} chars",
                          "jax" if impl.startswith("jaxgpt") else "torch", impl, 1,
                          steps if is_beam else len(tokens), m)
        probe = beam_probe if impl == torch_beam_name else score_probe if impl == torch_score_name else None
        if probe is not None:
            row["thread_probe"] = {str(n): v for n, v in probe.items()}
        if impl == torch_score_name:
            row["group_probe_s_per_window"] = group_probe
        # No FLOP floor for beam search: its windows' shared prefixes make the work data-dependent.
        rows.append(row if is_beam else roofline.annotate(row, score_flops, roofline.weight_bytes(cfg), limits))
    ratios = {
        "beam_b1_x4_vs_reference": {
            "what": f"beam search, {beams} beams x {steps} chars, batch 1: jaxgpt vs {torch_beam_name} (same tokens)",
            **paired_ratio(measured[torch_beam_name].runs, measured["jaxgpt beam_search"].runs)},
        "score_vs_tuned": {
            "what": f"score {len(tokens):,} chars (exact windows): jaxgpt vs {torch_score_name} "
                    f"(max |log p difference| {score_diff:.1e})",
            **paired_ratio(measured[torch_score_name].runs, measured["jaxgpt score"].runs)},
    }
    return rows, ratios


def markdown(doc: dict, warmup: int, context_length: int) -> str:
    """The run's report: the two ratios, then every row with its FLOP floor fraction."""
    load = doc["load_average"]
    lines = [f"# beam search and scoring ({doc['device']}, {doc['date']}, weights {doc['weights']})", "",
             f"Load average (1 min) {load[0]:.1f} at start, {load[1]:.1f} at end; {doc['reps']} measured rounds of "
             f"beam search, {doc['score_reps']} of scoring, each after {warmup} warm-up (scoring's warm-up: "
             f"{2 * context_length} characters, same programs).", "",
             "| comparison | ratio | per-round min-max |", "| --- | ---: | ---: |"]
    lines += [f"| {r['what']} | **{r['ratio']:.3g}x** | {r['paired']['min']:.3g}-{r['paired']['max']:.3g} |"
              for r in doc["ratios"].values()]
    peak = doc["limits"]["peak_gflops"] if doc.get("limits") else float("nan")
    lines += ["", f"FLOP floor: the work's FLOPs at the float32 matmul peak measured in this run ({peak:.0f} GFLOP/s), "
              f"over the median time; the score's work is one {context_length}-token window per character past the "
              "first (benchmarks.roofline.flops_window_step). Beam search has none (its shared-prefix windows make "
              "its work depend on the text).", "",
              "| benchmark | implementation | median s | IQR s | FLOP floor |", "| --- | --- | ---: | ---: | ---: |"]
    for r in doc["results"]:
        floor = f"{100 * r['floor_fraction']:.1f}%" if "floor_fraction" in r else "-"
        lines.append(f"| {r['name']} | {r['impl']} | {r['seconds']:.3g} | "
                     f"{r['spread']['q3'] - r['spread']['q1']:.3g} | {floor} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    from jaxgpt.host_memory import reuse_host_memory

    reuse_host_memory()
    p = argparse.ArgumentParser(prog="python -m benchmarks.beam_score", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--markdown", metavar="OUT")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--score-chars", type=int, default=10_000)
    p.add_argument("--score-reps", type=int, default=None, help="rounds of the score cases [default: --reps]")
    args = p.parse_args(argv)
    import tempfile

    from benchmarks.harness import cpu_description
    from benchmarks.models import build_models, default_weights
    from benchmarks.settings import FULL

    suite = FULL.replace(reps=args.reps, score_chars=args.score_chars)
    began = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - began:7.1f}s] {msg}", flush=True)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        models = build_models(suite.model, workdir, default_weights())
        limits = roofline.measure_limits(suite.limits_matmul, suite.limits_mbytes)
        rows, ratios = run(models, suite, limits, progress, args.score_reps)
    doc = {"device": cpu_description(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "weights": models.weights_source, "reps": suite.reps, "score_reps": args.score_reps or suite.reps,
           "limits": limits.as_dict(),
           "load_average": [load_start, os.getloadavg()[0]], "results": rows, "ratios": ratios}
    report = markdown(doc, suite.warmup, suite.model.context_length)
    print(report)
    from jaxgpt.atomic import write_json, write_text

    if args.json:
        write_json(args.json, doc)
    if args.markdown:
        write_text(args.markdown, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
