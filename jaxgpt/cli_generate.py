"""`jaxgpt generate`: sample text from a checkpoint, streamed to a terminal.

stdout carries exactly the generated characters (the prompt is not repeated, no newline is
added). With several samples (--batch B per --prompt, --prompt repeatable) they follow one
another, each after the first introduced by a newline and a line `--- sample N ---`:

    <sample 1>
    --- sample 2 ---
    <sample 2>

With --beams N, beam search replaces sampling (jaxgpt/cli_beam.py): the likeliest continuation
of each prompt, or with --json every beam and its score.

With --json, stdout has one JSON object per sample and line instead: its text, finish reason,
log-probabilities (--logprobs N) and everything needed to reproduce it (prompt, seed and random
stream, options, slots). Everything else (model, timing) goes to stderr. When stdout is a
terminal the first sample is printed chunk by chunk as it is generated (the others once they are
done); the characters are the same as without streaming. All samples are requests to one
engine (`jaxgpt.stream_completions`): sample r has the random stream (seed, r).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from jaxgpt.cli import load_model
from jaxgpt.cli_devices import devices_option

STREAM_CHUNK = 16  # steps per compiled call when streaming


def _separator(index: int) -> str:
    return f"\n--- sample {index + 1} ---\n"


@click.command("generate")
@click.option("--weights", type=str, default=None, metavar="PATH",
              help="Checkpoint: torch .pt, .safetensors or jaxgpt orbax directory [default: the bundled one].")
@click.option("--vocab", type=str, default=None, metavar="JSON",
              help="id -> character JSON for checkpoints with another vocabulary [default: vocab.json beside the weights, "
                   "else the published 104 characters].")
@click.option("--prompt", "prompts", type=str, multiple=True,
              help='Text to continue ("": start from a newline, as the notebook) [default: ""]; repeatable: one '
                   "request per prompt, of any lengths.")
@click.option("--num-chars", type=click.IntRange(min=1), default=500, show_default=True, help="Characters to generate.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=1.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep the k most likely characters (ties kept).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Nucleus sampling mass, in (0, 1].")
@click.option("--min-p", type=float, default=None, help="Keep characters with probability >= MIN_P x the top one, in [0, 1].")
@click.option("--repetition-penalty", type=float, default=None,
              help="> 0: logits of characters in the current window divided (positive) or multiplied (negative) by it.")
@click.option("--ban", type=str, default=None, metavar="CHARS", help="Characters never to generate.")
@click.option("--stop", "stops", type=str, multiple=True, help="Stop when the text ends with this (not printed); repeatable.")
@click.option("--logprobs", type=int, default=0, show_default=True,
              help="With --json: each character's log-probability and the N likeliest alternatives.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Independent samples per prompt.")
@click.option("--slots", type=int, default=None,
              help="Rows per compiled step (a sample's bits then depend on nothing else) [default: the number of samples].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample on stdout.")
@click.option("--mode", type=click.Choice(["exact", "strided"]), default="exact", show_default=True,
              help="exact: the notebook's loop; strided: drop --stride tokens at once when the window is full (faster).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Strided mode only [default: context_length // 2].")
@click.option("--stream/--no-stream", default=None, help="Print chunk by chunk [default: when stdout is a terminal].")
@devices_option("Split the samples (the text does not depend on it)")
@click.option("--beams", type=click.IntRange(min=1), default=None,
              help="Beam search with N beams instead of sampling: the likeliest continuation found (--json: every "
                   "beam and its score).")
@click.option("-q", "--quiet", is_flag=True, help="No diagnostics on stderr.")
def generate_command(weights, vocab, prompts, num_chars, seed, temperature, top_k, top_p, min_p, repetition_penalty,
                     ban, stops, logprobs, batch, slots, as_json, mode, stride, stream, devices, beams, quiet) -> None:
    """Generate text with the notebook's sampling loop, compiled."""
    from jaxgpt import compile_cache

    started = time.perf_counter()
    cache = compile_cache.enable()

    from jaxgpt.batching import Sampler
    from jaxgpt.requests import stream_completions

    if devices is not None:  # before loading anything; the message names the flag
        from jaxgpt.sharding import resolve_devices

        resolve_devices(devices, name="--devices")
    model, path, characters, vocab_source = load_model(weights, vocab)
    config = model.config
    if beams is not None:  # jaxgpt/cli_beam.py
        from jaxgpt.cli_beam import run_beams

        return run_beams(model, characters, path, prompts or ("",), num_chars, beams, stops, as_json=as_json,
                         devices=devices, quiet=quiet, sampling=dict(
                             seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty, ban=ban, logprobs=logprobs, batch=batch,
                             slots=slots, mode=mode, stride=stride))
    if logprobs and not as_json:
        raise click.UsageError("--logprobs needs --json: the text output has no place for log-probabilities")
    rows = [p for p in (prompts or ("",)) for _ in range(batch)]
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, stop=list(stops),
                   logit_bias={c: float("-inf") for c in ban} if ban else None,
                   logprobs=logprobs, mode=mode, stride=stride)
    streaming = (sys.stdout.isatty() if stream is None else stream) and not as_json
    # Validates every value (one line on stderr for the first bad one) before anything runs.
    events = stream_completions(Sampler(model), rows, num_chars, seed=seed, vocab=characters, devices=devices,
                                slots=slots, chunk_size=STREAM_CHUNK if streaming else None, **options)
    if not quiet:
        print(f"jaxgpt: {path}: {config.variant}, {model.num_params():,} parameters, context {config.context_length}; "
              f"{mode} mode, {len(rows)} sample{'s' * (len(rows) > 1)}, seed {seed}"
              + ("" if cache else " (no compilation cache)"), file=sys.stderr)
    loaded = time.perf_counter()
    try:
        if as_json:
            run = dict(seed=seed, num_chars=num_chars, options=dict(options, ban=ban), slots=slots, weights=path,
                       vocab=vocab_source if os.path.isfile(vocab_source) else None)  # None: the published map
            first_chunk, count = _write_json(events, rows, characters, run)
        else:
            first_chunk, count = _write_samples(events, len(rows), streaming)
    except BrokenPipeError:  # e.g. `jaxgpt generate | head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise click.exceptions.Exit(141) from None
    done = time.perf_counter()
    if not quiet:
        # Leading newline on a terminal: the shell prompt must not follow the text on its line.
        lead = "\n" if sys.stdout.isatty() else ""
        print(f"{lead}jaxgpt: {count} characters in {done - loaded:.2f} s (the first after "
              f"{first_chunk - loaded:.2f} s, compilation or compiled-code loading included; checkpoint "
              f"loaded in {loaded - started:.2f} s)", file=sys.stderr)


def _write_samples(events, rows: int, streaming: bool) -> tuple[float, int]:
    """Writes sample 1 (chunk by chunk when streaming), then the others; returns (first time, characters)."""
    first_chunk, count = None, 0
    samples = [[] for _ in range(rows)]
    out = sys.stdout
    for event in events:
        first_chunk = first_chunk or time.perf_counter()
        samples[event.tag].append(event.text)
        count += len(event.text)
        if streaming and event.tag == 0:
            out.write(event.text)
            out.flush()
    if not streaming:
        out.write("".join(samples[0]))
    for row in range(1, rows):
        out.write(_separator(row) + "".join(samples[row]))
    out.flush()
    return first_chunk or time.perf_counter(), count


def _write_json(events, rows: list[str], vocab, run: dict) -> tuple[float, int]:
    """One JSON object per sample, in order, once each is finished (`run`: what every record repeats)."""
    first_chunk, count = None, 0
    parts: dict[int, list] = {r: [] for r in range(len(rows))}
    written = 0
    for event in events:
        first_chunk = first_chunk or time.perf_counter()
        parts[event.tag].append(event)
        count += len(event.tokens)
        while written < len(rows) and parts[written] and parts[written][-1].finish_reason is not None:
            print(json.dumps(_record(written, rows[written], parts.pop(written), vocab, run)), flush=True)
            written += 1
    return first_chunk or time.perf_counter(), count


def _record(index: int, prompt: str, events: list, vocab, run: dict) -> dict:
    """A sample's JSON: its text and log-probabilities, and what reproduces it (`run`'s seed,
    num_chars, options, slots, weights and vocab, and the sample's random stream)."""
    from jaxgpt.requests import completion_from_events

    done = completion_from_events(events, vocab)
    # --ban says what logit_bias would (JSON has no -inf)
    options = {k: v for k, v in run["options"].items() if k != "logit_bias" and v not in (None, [], ())}
    return {"index": index, "prompt": prompt, "text": done.text, "finish_reason": done.finish_reason,
            "logprobs": None if done.logprobs is None else [float(x) for x in done.logprobs],
            "top_logprobs": done.top_logprobs, "seed": run["seed"], "stream": index,
            "num_chars": run["num_chars"], "options": options,
            "slots": run["slots"], "weights": run["weights"], "vocab": run["vocab"]}


def register(app) -> None:
    app.add_command(generate_command)
