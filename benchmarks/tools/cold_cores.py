"""How fast the calls after a pause run: jaxgpt's forward (1, 128), and ONNX Runtime's beside it.

    python -m benchmarks.tools.cold_cores [--pause 0.3] [--calls 25] [--rounds 8]

Each round pauses, then times `--calls` forward calls one after another, and prints the median
over the rounds of every call's time, in order: the first calls after the pause against the
later ones. Pauses: "sleep" (the whole process idle), "busy" (the calling thread spins, the
other cores idle), "none" (the calls follow the previous round's at once). ONNX Runtime (with
the `[onnx]` extra) runs twice: with its default thread pool, whose workers spin for a while
after each call, and with `session.force_spinning_stop` (they stop when a call returns).

This is what `benchmarks.harness.interleave`'s lead-in answers: on a VM whose idle cores slow
down, a case shorter than the slow stretch is timed mostly on slow cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _pause(kind: str, seconds: float) -> None:
    if kind == "sleep":
        time.sleep(seconds)
    elif kind == "busy":
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass


def curve(call, pause: str, seconds: float, calls: int, rounds: int) -> list[float]:
    """Median over `rounds` of each of `calls` consecutive calls' times (ms), after `pause`."""
    times = []
    for _ in range(rounds):
        _pause(pause, seconds)
        run = []
        for _ in range(calls):
            begin = time.perf_counter()
            call()
            run.append((time.perf_counter() - begin) * 1e3)
        times.append(run)
    return [statistics.median(column) for column in zip(*times)]


def _ort_calls(weights, model, tokens):
    from benchmarks import onnx_runtime

    if not onnx_runtime.available():
        return {}
    import onnxruntime as ort
    import torch

    from porting.torch_reference import reference_from_config

    reference = reference_from_config(model.config)
    reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    path = onnx_runtime.export(reference, tempfile.mkdtemp() + "/model.onnx", model.config)
    out = {}
    for name, stop in (("onnxruntime (spinning workers)", "0"), ("onnxruntime (force_spinning_stop)", "1")):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.force_spinning_stop", stop)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        out[name] = lambda s=session: s.run(None, {"tokens": tokens.astype("int64")})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pause", type=float, default=0.3, help="seconds of each pause")
    p.add_argument("--calls", type=int, default=25, help="calls timed after each pause")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    import jaxgpt
    import porting

    model = porting.load_weights(jaxgpt.DEFAULT_WEIGHTS)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, model.config.context_length))
    device_tokens = jax.device_put(tokens.astype(np.int32))
    calls = {"jaxgpt": lambda: forward(state, device_tokens).block_until_ready(),
             **_ort_calls(jaxgpt.DEFAULT_WEIGHTS, model, tokens)}
    for name, call in calls.items():
        for _ in range(10):
            call()
        print(name)
        for pause in ("sleep", "busy", "none"):
            times = curve(call, pause, args.pause, args.calls, args.rounds)
            print(f"  after {pause:5s}: " + " ".join(f"{t:.1f}" for t in times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
