"""Multi-device checks for tests/test_sharding.py, run as a script in a fresh process.

Simulated CPU devices exist only if XLA_FLAGS=--xla_force_host_platform_device_count=N is set
before jax is imported, so the test runs this file with that flag (the rest of the suite stays
single-device) and asserts on the JSON it prints:

    python tests/sharding_worker.py TEXT_FILE OUT_DIR  ->  one JSON object on stdout

Nothing is asserted here: it only records tokens, losses, shardings and error messages.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

from jaxgpt import engine, sharding
from jaxgpt.cli import main as cli_main
from jaxgpt.config import GPTConfig
from jaxgpt.data import get_batch, train_val_split
from jaxgpt.generate import generate_tokens, stream_tokens
from jaxgpt.model import GPT
from jaxgpt.train import TrainConfig, data_parallel_mesh, fit, make_optimizer, make_train_step, split_modes
from jaxgpt.vocab import default_vocab

C = 16
GEN_CONFIG = GPTConfig(vocab_size=12, context_length=C, model_dim=24, num_blocks=2, num_heads=3)
TRAIN_CONFIG = GPTConfig(context_length=16, model_dim=32, num_blocks=2, num_heads=2, dropout=0.2)
TRAIN = TrainConfig(steps=20, batch_size=16, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=5,
                    eval_interval=10, eval_batches=2, checkpoint_interval=10, log_interval=1, seed=0)
SETTINGS = {"greedy": dict(temperature=0.0), "multinomial": dict(),
            "filtered": dict(temperature=0.7, top_k=5, top_p=0.9)}
# CLI training run that the multi-process test repeats on 2 processes x 2 devices.
CLI_TRAIN = ["--steps", "6", "--context-length", "16", "--model-dim", "16", "--num-blocks", "1", "--num-heads", "2",
             "--batch-size", "8", "--eval-interval", "3", "--eval-batches", "2", "--checkpoint-interval", "3",
             "--log-interval", "1", "-q"]


def shard_facts(array: jax.Array) -> dict:
    return {"spec": str(array.sharding.spec), "num_devices": len(array.sharding.device_set),
            "shard_shapes": [list(s.data.shape) for s in array.addressable_shards]}


def generation() -> dict:
    model = GPT(GEN_CONFIG, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    contexts = {5: rng.integers(0, 12, (5, 5)), 13: rng.integers(0, 12, (13, 5))}
    contexts[7] = rng.integers(0, 12, (7, 5))  # 7 rows decode whole-cache; padded to 8, in blocks
    tokens = {}
    for batch, context in contexts.items():
        for name, kw in SETTINGS.items():
            for devices in (1, 2, 8):
                tokens[f"{batch}/{name}/{devices}"] = generate_tokens(model, context, 3 * C, seed=4, devices=devices,
                                                                      **kw).tolist()
    # Default devices (all 8), chunked: the carry stays split from one compiled call to the next.
    tokens["13/filtered/default-chunked"] = np.concatenate(list(stream_tokens(
        model, contexts[13], 3 * C, seed=4, chunk_size=7, **SETTINGS["filtered"])), axis=1).tolist()

    # What the compiled loop returns on 8 devices: spy on engine.generate's output.
    seen = {}
    generate = engine.generate

    def spy(*args, **kwargs):
        slots, chunk = generate(*args, **kwargs)
        seen.update(stream=shard_facts(slots.window), cache_k=shard_facts(slots.cache[0].k))
        return slots, chunk

    engine.generate = spy
    try:
        generate_tokens(model, contexts[13], 3 * C, seed=4, devices=8)
    finally:
        engine.generate = generate
    # 13 and 14 rows both pad to 16 on 8 devices: no new trace.
    before = dict(engine.TRACE_COUNTS)
    generate_tokens(model, np.zeros((14, 5), np.int32), 3 * C, seed=1, devices=8)
    retraced = dict(engine.TRACE_COUNTS) != before
    # A new batch size streamed in 7 chunks: one trace each, the carry is fed back as returned.
    before = dict(engine.TRACE_COUNTS)
    list(stream_tokens(model, np.zeros((24, 5), np.int32), 3 * C, seed=1, chunk_size=7))
    chunked = {name: engine.TRACE_COUNTS[name] - before.get(name, 0) for name in ("prefill", "insert", "generate")}
    return {"tokens": tokens, "sharded_carry": seen, "retraced_for_14_rows": retraced, "chunked_traces": chunked}


def training(text_path: str) -> dict:
    with open(text_path, encoding="utf-8") as f:
        split = train_val_split(default_vocab().encode(f.read()), 0.1, TRAIN_CONFIG.context_length)
    losses, val_losses, params_sharding = {}, {}, {}
    for devices in (8, 1):
        model, history = fit(GPT(TRAIN_CONFIG, rngs=nnx.Rngs(0)), split, TRAIN, progress=False, devices=devices)
        losses[devices] = [r["loss"] for r in history]
        val_losses[devices] = [r["val_loss"] for r in history if "val_loss" in r]
        leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
        params_sharding[devices] = {"spec": str(leaf.sharding.spec), "num_devices": len(leaf.sharding.device_set)}
    # The data-parallel step as compiled: the gradient mean is an all-reduce XLA inserted.
    mesh = data_parallel_mesh(None, TRAIN.batch_size)
    train_def, _, params = split_modes(GPT(TRAIN_CONFIG, rngs=nnx.Rngs(0)))
    tx = make_optimizer(TRAIN)
    x, y = get_batch(split.train, 16, TRAIN.batch_size, 0, 0)
    step = make_train_step(train_def, tx, mesh)
    hlo = step.lower(params, tx.init(params), x, y, jax.random.key(0)).compile().as_text()
    try:
        fit(GPT(TRAIN_CONFIG), split, TRAIN.replace(batch_size=12), progress=False)
        indivisible = None
    except ValueError as e:
        indivisible = f"{type(e).__name__}: {e}"
    return {"losses": losses, "val_losses": val_losses, "params_sharding": params_sharding,
            "all_reduce_in_step": "all-reduce" in hlo, "indivisible_batch_error": indivisible}


def evaluation(text_path: str) -> dict:
    """Loss of one model over the text on 1, 3 and 8 devices (3 pads each batch of 8 to 9 rows)."""
    from jaxgpt.evaluate import evaluate

    with open(text_path, encoding="utf-8") as f:
        tokens = default_vocab().encode(f.read()[:3000])
    model = GPT(GEN_CONFIG.replace(vocab_size=default_vocab().size), rngs=nnx.Rngs(5))
    results = {str(d): evaluate(model, tokens, batch_size=8, devices=d).as_dict() for d in (1, 3, 8)}
    results["default"] = evaluate(model, tokens, batch_size=8).as_dict()
    return results


def cli(text_path: str, out_dir: str) -> dict:
    def run(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main([str(a) for a in args])
        return {"code": code, "stderr": err.getvalue()}

    reference = os.path.join(out_dir, "single")
    return {
        "indivisible": run("train", "--text", text_path, "--out", os.path.join(out_dir, "bad"), *CLI_TRAIN,
                           "--batch-size", "12"),
        "indivisible_out_exists": os.path.exists(os.path.join(out_dir, "bad")),
        "reference": run("train", "--text", text_path, "--out", reference, *CLI_TRAIN, "--devices", "1"),
        "reference_history": os.path.join(reference, "history.json"),
        "eval_too_many_devices": run("eval", "--text", text_path, "--devices", "9", "-q"),
    }


if __name__ == "__main__":
    text, out = sys.argv[1], sys.argv[2]
    os.environ["JAXGPT_NO_COMPILE_CACHE"] = "1"
    doc = {"device_count": jax.device_count(), "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
           "default_mesh_size": sharding.data_mesh().size}
    doc["generation"] = generation()
    doc["training"] = training(text)
    doc["evaluation"] = evaluation(text)
    doc["cli"] = cli(text, out)
    print(json.dumps(doc))
