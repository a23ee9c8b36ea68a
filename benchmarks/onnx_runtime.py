"""ONNX Runtime, the third framework: the notebook model exported with `torch.onnx.export`.

What a user who wants fast CPU inference of a torch model does: export it to ONNX (opset 17)
and run it on ONNX Runtime. The exported model is the notebook's own (`porting.torch_reference`,
the same weights as every other side), with batch and length dynamic, so that the notebook's
loop (crop to C, a full forward per character, no cache) runs on it unchanged. It runs on the
CPU execution provider with every graph optimisation (`ORT_ENABLE_ALL`: fused attention
patterns, GELU/LayerNorm/MatMul fusions, constant folding), one session per intra-op thread
count tried (like the torch sides, the suite takes the fastest).

Needs the optional `[onnx]` extra (onnx, onnxruntime); without it the suite leaves this
framework out and says so.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

OPSET = 17


def available() -> bool:
    """Whether onnx and onnxruntime are importable (the `[onnx]` extra)."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export writes through it
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export(reference, path: str, config) -> str:
    """Writes the torch model `reference` (CPU, eval mode) to `path` as ONNX; returns `path`.

    Input "tokens" int64 `(batch, time)`, output "logits" float32 `(batch, time, V)`, both axes
    dynamic. The TorchScript-based exporter (`dynamo=False`) needs no onnxscript.
    """
    import warnings

    import torch

    example = torch.zeros((1, config.context_length), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(reference.cpu().eval(), (example,), path, opset_version=OPSET, dynamo=False,
                          input_names=["tokens"], output_names=["logits"],
                          dynamic_axes={"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}})
    return path


class OrtModel:
    """One exported model and a session per intra-op thread count.

    Attributes:
      path: the .onnx file.
      threads: the intra-op thread counts, os.cpu_count() (ORT's default: one per core) first.
      sessions: thread count -> `onnxruntime.InferenceSession`.
    """

    def __init__(self, path: str, threads=None):
        import onnxruntime as ort

        self.path = path
        self.threads = list(dict.fromkeys(threads or [os.cpu_count() or 1, 1]))
        self.sessions = {}
        for n in self.threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = n
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[n] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def logits(self, tokens, threads: int | None = None) -> np.ndarray:
        """float32 `(B, T, V)` logits of int tokens `(B, T)`, T <= context_length."""
        session = self.sessions[threads or self.threads[0]]
        return session.run(None, {"tokens": np.asarray(tokens, np.int64)})[0]


def notebook_loop(model: OrtModel, num_new: int, context, context_length: int, threads: int, *,
                  rng: np.random.Generator | None = None, greedy: bool = False, on_token=None) -> np.ndarray:
    """The notebook's generation loop on ONNX Runtime: crop, full forward, draw, append.

    Args:
      model: an `OrtModel`.
      num_new: characters per row.
      context: int `(B, T0)` prompt (the notebook's `[[0]]`).
      context_length: C; the context is cropped to its last C tokens before every forward.
      threads: which session (intra-op thread count) runs.
      rng: numpy generator of the draws (inverse CDF of the softmax, as torch.multinomial draws
        from it); greedy: argmax instead.
      on_token: called as `on_token(step)` once step's tokens exist.

    Returns:
      int64 `(B, num_new)` tokens.
    """
    session = model.sessions[threads]
    rng = rng if rng is not None else np.random.default_rng(0)
    context = np.asarray(context, np.int64)
    out = np.empty((context.shape[0], num_new), np.int64)
    for s in range(num_new):
        context = context[:, -context_length:]
        logits = session.run(None, {"tokens": context})[0][:, -1]  # (B, V)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            p = np.exp(logits - logits.max(-1, keepdims=True))
            cdf = np.cumsum(p, -1)
            u = rng.random((len(p), 1)) * cdf[:, -1:]
            nxt = np.minimum((cdf <= u).sum(-1), p.shape[-1] - 1)
        out[:, s] = nxt
        context = np.concatenate([context, nxt[:, None]], axis=1)
        if on_token is not None:
            on_token(s)
    return out


def loop_case(model: OrtModel, batch: int, steps: int, marks: tuple[int, ...], threads: int, context_length: int):
    """A harness case: the ORT notebook loop, with time to first character and the marks."""
    from benchmarks.harness import loop_result

    def case(warm: bool):
        n = min(steps, 2) if warm else steps  # nothing to compile: a short warm-up suffices
        done = [0.0] * n
        context = np.zeros((batch, 1), np.int64)
        begin = time.perf_counter()
        notebook_loop(model, n, context, context_length, threads, rng=np.random.default_rng(0),
                      on_token=lambda s: done.__setitem__(s, time.perf_counter() - begin))
        return loop_result(time.perf_counter() - begin, done, marks, partial=warm)

    return case


def probe(model: OrtModel, batch: int, steps: int, context_length: int, rounds: int = 3) -> tuple[list[int], dict]:
    """Thread counts worth measuring for the ORT loop: within 2x of the best score.

    A count's score is the cost of a representative run, min(steps, C) forwards of C/2 tokens
    and max(steps - C, 0) of C tokens (the median of `rounds` after a warm-up), as the torch probe.

    Returns:
      (counts, fastest first; {count: {"window_s", "half_window_s", "score_s"}}).
    """
    c = context_length
    grow, full = min(steps, c), max(steps - c, 0)
    tokens = np.zeros((batch, c), np.int64)
    figures = {}
    for n in model.threads:
        figure = {}
        for label, t in (("window", c), ("half_window", c // 2)):
            times = []
            for _ in range(rounds + 1):
                begin = time.perf_counter()
                model.logits(tokens[:, :t], n)
                times.append(time.perf_counter() - begin)
            figure[f"{label}_s"] = statistics.median(times[1:])
        figure["score_s"] = full * figure["window_s"] + grow * figure["half_window_s"]
        figures[n] = figure
    ranked = sorted(figures, key=lambda n: figures[n]["score_s"])
    return [n for n in ranked if figures[n]["score_s"] <= 2 * figures[ranked[0]]["score_s"]], figures
