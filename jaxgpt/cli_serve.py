"""`jaxgpt serve`: the OpenAI-compatible completion server (jaxgpt/serving/).

Loads the checkpoint once, compiles the engine's programs (with the persistent compilation
cache), then prints one line with the URL on stdout when it accepts connections:

    jaxgpt: serving http://127.0.0.1:8000 (32 slots; Ctrl-C stops)

Everything else goes to stderr. Ctrl-C / SIGTERM stops accepting, lets running requests finish
for a few seconds, ends the rest with an error event, and exits 0.
"""

from __future__ import annotations

import gc
import logging
import sys
import time

import click

from jaxgpt.cli import CLIError, load_model
from jaxgpt.cli_devices import devices_option


@click.command("serve")
@click.option("--weights", type=str, default=None, metavar="PATH",
              help="Checkpoint: torch .pt, .safetensors, jaxgpt orbax directory or jaxgpt train --out directory "
                   "[default: the bundled one].")
@click.option("--vocab", type=str, default=None, metavar="JSON",
              help="id -> character JSON [default: vocab.json beside the weights, else the published 104 characters].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; a non-loopback one needs --api-key (or --insecure).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Engine slots: rows generated together. Answers equal jaxgpt.complete(..., slots=MAX_BATCH).")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rows that may wait for a slot; beyond it requests get 429.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Cap on a request's max_tokens (characters).")
@click.option("--api-key", envvar="JAXGPT_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health [env: JAXGPT_API_KEY].")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@devices_option("Shard the slots")
@click.option("--chunk", type=click.IntRange(min=1), default=None,
              help="Most generation steps per engine call [default: 8, at most 32]; the calls start at 1 step "
                   "when requests join and double back up to it. Shorter: new requests join and stream sooner, "
                   "longer: less overhead per character. Never changes an answer.")
@click.option("--model-name", default="jaxgpt", show_default=True, help="The model id in /v1/models and responses.")
@click.option("-q", "--quiet", is_flag=True, help="No diagnostics on stderr.")
def serve_command(weights, vocab, host, port, max_batch, max_queue, max_tokens, api_key, insecure, devices,
                  chunk, model_name, quiet) -> None:
    """Serve completions over HTTP (OpenAI protocol), with continuous batching and seed-exact answers."""
    from jaxgpt.serving.server import bind, is_loopback

    if api_key is not None and not api_key.strip():
        raise CLIError("--api-key: the key is empty")
    if not is_loopback(host) and api_key is None and not insecure:
        raise CLIError(f"--host {host} is not a loopback address: anyone who can reach it could use the server; "
                       "pass --api-key KEY (or set JAXGPT_API_KEY), or --insecure to allow it without a key")
    try:
        sock = bind(host, port)  # before compiling: a taken port fails at once
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    started = time.perf_counter()
    from jaxgpt import compile_cache

    cache = compile_cache.enable()
    from jaxgpt.serving.app import create_app
    from jaxgpt.serving.backend import EngineUnavailable
    from jaxgpt.serving.server import Server

    model, path, characters, _ = load_model(weights, vocab)
    config = model.config
    if devices is not None:
        import jax

        if devices > jax.local_device_count():
            raise CLIError(f"--devices {devices}: only {jax.local_device_count()} local devices are visible")
    if not quiet:
        print(f"jaxgpt: {path}: {config.variant}, {model.num_params():,} parameters, context {config.context_length}; "
              f"{max_batch} slots; compiling" + ("" if cache else " (no compilation cache)"), file=sys.stderr)
    try:
        app = create_app(model, vocab=characters, max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
                         api_key=api_key, devices=devices, model_name=model_name, chunk=chunk)
    except EngineUnavailable as e:
        raise CLIError(str(e)) from None
    # Start-up leaves a great many long-lived objects (modules, the model, compiled programs); a
    # full collection walks them all, stalling every request for as long (see the Serving results).
    # Frozen, the collector never scans them again; it still collects what requests allocate.
    gc.collect()
    gc.freeze()

    def ready(url: str) -> None:
        if not quiet:
            print(f"jaxgpt: ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(f"jaxgpt: serving {url} ({max_batch} slots; Ctrl-C stops)", flush=True)

    log = logging.getLogger("jaxgpt.serve")  # a failed request's message and traceback
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jaxgpt: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    try:
        Server(app, sock, on_ready=ready, log_level="warning" if not quiet else "error").run()
    finally:  # a second run in this process adds its own handler: no line printed twice
        log.removeHandler(handler)
    if not quiet:
        print("jaxgpt: stopped", file=sys.stderr)


def register(app) -> None:
    app.add_command(serve_command)
