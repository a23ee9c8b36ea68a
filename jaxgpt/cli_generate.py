"""`jaxgpt generate`: sample text from a checkpoint, streamed to a terminal.

stdout carries exactly the generated characters (the prompt is not repeated, no newline is
added). With --batch B > 1 the samples follow one another, each after the first introduced
by a newline and a line `--- sample N ---`:

    <sample 1>
    --- sample 2 ---
    <sample 2>

Everything else (model, timing) goes to stderr. When stdout is a terminal the first sample is
printed chunk by chunk as it is generated (the others once it is done); the characters are
the same as without streaming, since the randomness depends only on (seed, row, step).
"""

from __future__ import annotations

import os
import sys
import time

import click

from jaxgpt.cli import CLIError, default_weights, load_vocab

STREAM_CHUNK = 16  # characters per compiled call when streaming


def _separator(index: int) -> str:
    return f"\n--- sample {index + 1} ---\n"


@click.command("generate")
@click.option("--weights", type=str, default=None, metavar="PATH",
              help="Checkpoint: torch .pt, .safetensors or jaxgpt orbax directory [default: the bundled one].")
@click.option("--vocab", type=str, default=None, metavar="JSON",
              help="id -> character JSON for checkpoints with another vocabulary [default: vocab.json beside the weights, "
                   "else the published 104 characters].")
@click.option("--prompt", type=str, default="", show_default=True,
              help='Text to continue ("": start from a newline, as the notebook).')
@click.option("--num-chars", type=click.IntRange(min=1), default=500, show_default=True, help="Characters to generate.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=1.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep the k most likely characters (ties kept).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Nucleus sampling mass, in (0, 1].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Independent samples.")
@click.option("--mode", type=click.Choice(["exact", "strided"]), default="exact", show_default=True,
              help="exact: the notebook's loop; strided: drop --stride tokens at once when the window is full (faster).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Strided mode only [default: context_length // 2].")
@click.option("--stream/--no-stream", default=None, help="Print chunk by chunk [default: when stdout is a terminal].")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="Split the --batch samples over the first N local devices [default: all; 1: one device]; "
              "the text does not depend on it.")
@click.option("-q", "--quiet", is_flag=True, help="No diagnostics on stderr.")
def generate_command(weights, vocab, prompt, num_chars, seed, temperature, top_k, top_p, batch, mode, stride,
                     stream, devices, quiet) -> None:
    """Generate text with the notebook's sampling loop, compiled."""
    from jaxgpt import compile_cache

    if stride is not None and mode != "strided":
        raise CLIError("--stride applies to --mode strided only")
    started = time.perf_counter()
    cache = compile_cache.enable()

    from porting import load_weights

    from jaxgpt.generate import stream_text

    path = weights if weights is not None else default_weights()
    characters, vocab_source = load_vocab(vocab, path)
    model = load_weights(path)
    config = model.config
    if characters.size != config.vocab_size:
        raise CLIError(f"{vocab_source} has {characters.size} characters but {path} has "
                       f"vocab_size {config.vocab_size}: pass the checkpoint's vocabulary with --vocab")
    unknown = characters.unknown_chars(prompt)
    if unknown:
        raise CLIError(f"--prompt: characters not in the vocabulary: {', '.join(repr(c) for c in unknown[:10])}")
    if stride is not None and not 1 <= stride <= config.context_length:
        raise CLIError(f"--stride must be in 1..{config.context_length} (the checkpoint's context_length), got {stride}")
    if devices is not None:
        import jax

        if devices > jax.local_device_count():
            raise CLIError(f"--devices {devices}: only {jax.local_device_count()} local devices are visible")

    streaming = sys.stdout.isatty() if stream is None else stream
    if not quiet:
        print(f"jaxgpt: {path}: {config.variant}, {model.num_params():,} parameters, context {config.context_length}; "
              f"{mode} mode, batch {batch}, seed {seed}"
              + ("" if cache else " (no compilation cache)"), file=sys.stderr)
    chunks = stream_text(model, prompt, num_chars, batch=batch, vocab=characters,
                         chunk_size=STREAM_CHUNK if streaming else None, seed=seed, temperature=temperature,
                         top_k=top_k, top_p=top_p, mode=mode, stride=stride, devices=devices)
    loaded = time.perf_counter()
    try:
        first_chunk = _write_samples(chunks, batch, streaming)
    except BrokenPipeError:  # e.g. `jaxgpt generate | head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise click.exceptions.Exit(141) from None
    done = time.perf_counter()
    if not quiet:
        # Leading newline on a terminal: the shell prompt must not follow the text on its line.
        lead = "\n" if sys.stdout.isatty() else ""
        print(f"{lead}jaxgpt: {batch * num_chars} characters in {done - loaded:.2f} s (the first after "
              f"{first_chunk - loaded:.2f} s, compilation or compiled-code loading included; checkpoint "
              f"loaded in {loaded - started:.2f} s)", file=sys.stderr)


def _write_samples(chunks, batch: int, streaming: bool) -> float:
    """Writes sample 1 (chunk by chunk when streaming), then the others; returns the first chunk's time."""
    first_chunk = None
    samples = [[] for _ in range(batch)]
    out = sys.stdout
    for chunk in chunks:
        first_chunk = first_chunk or time.perf_counter()
        for row, text in enumerate(chunk):
            samples[row].append(text)
        if streaming:
            out.write(chunk[0])
            out.flush()
    if not streaming:
        out.write("".join(samples[0]))
    for row in range(1, batch):
        out.write(_separator(row) + "".join(samples[row]))
    out.flush()
    return first_chunk


def register(app) -> None:
    app.add_command(generate_command)
