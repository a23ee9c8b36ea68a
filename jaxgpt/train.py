"""Training with optax: AdamW, warmup + cosine schedule, gradient clipping, dropout, orbax resume.

The compiled step takes the parameters and optimizer state as traced (donated) arguments; the
model structure (graphdef) and the optimizer are closed over, so the step compiles once per
(model config, TrainConfig, batch shape). Batches and dropout keys are pure functions of
(seed, step), which is what makes a resumed run reproduce an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.data import Split, get_batch
from jaxgpt.model import GPT


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters. Changing any of them recompiles the train step."""

    steps: int = 5000
    batch_size: int = 64
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 250
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.learning_rate <= 0 or self.min_learning_rate < 0:
            raise ValueError("learning rates must be positive and warmup_steps >= 0")


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.min_learning_rate,
    )
    # Decay matrices and embeddings only (as nanoGPT): biases and LayerNorm scales keep their scale.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay, mask=decay_mask),
    )


def cross_entropy(logits, targets):
    """Mean next-character loss in nats. logits `(B, T, V)`, targets int `(B, T)`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
    """Returns jitted `step(params, opt_state, x, y, key) -> (params, opt_state, loss, grad_norm)`.

    `graphdef` must come from a model in training mode (dropout on).
    """

    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            return cross_entropy(nnx.merge(graphdef, p)(x, rngs=key), y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_loss(graphdef) -> Callable:
    """Returns jitted `loss(params, x, y) -> mean loss` for a model graphdef in eval mode."""
    return jax.jit(lambda params, x, y: cross_entropy(nnx.merge(graphdef, params)(x), y))


def split_modes(model: GPT):
    """(train graphdef, eval graphdef, params): one parameter tree, two static structures."""
    model.train()
    train_def, params = nnx.split(model)
    model.eval()
    eval_def, _ = nnx.split(model)
    return train_def, eval_def, params


def estimate_loss(eval_loss, params, tokens: np.ndarray, context_length: int, batch_size: int, batches: int, seed: int):
    """Mean loss over `batches` random batches drawn with a fixed seed (the same every time)."""
    losses = [
        eval_loss(params, *get_batch(tokens, context_length, batch_size, seed, 10_000_000 + i)) for i in range(batches)
    ]
    return float(np.mean(jax.device_get(losses)))


def _checkpoint_manager(directory: str, interval: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=interval, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def fit(
    model: GPT,
    split: Split,
    config: TrainConfig,
    *,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> tuple[GPT, list[dict]]:
    """Trains `model` in place-equivalent fashion and returns (trained model, history).

    With `checkpoint_dir`, an orbax checkpoint (params, optimizer state, step) is written every
    `checkpoint_interval` steps and at the end, and training resumes from the latest one found
    there: batches and dropout keys depend only on (seed, step), so the resumed run computes
    exactly what the uninterrupted one would have.

    Returns:
      The model in eval mode with the trained parameters, and a list of history records
      `{"step", "loss", "grad_norm", "lr", "val_loss"?, "tokens_per_s"}`.
    """
    from tqdm.auto import tqdm

    mc: GPTConfig = model.config
    train_def, eval_def, params = split_modes(model)
    tx = make_optimizer(config)
    opt_state = tx.init(params)
    train_step = make_train_step(train_def, tx)
    eval_loss = make_eval_loss(eval_def)
    schedule_lr = lambda s: float(
        optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1),
            config.min_learning_rate,
        )(s)
    )
    history: list[dict] = []
    start = 0
    manager = None
    if checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        manager = _checkpoint_manager(checkpoint_dir, config.checkpoint_interval)
        latest = manager.latest_step()
        if latest is not None:
            target = {"params": params, "opt_state": opt_state}
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            params, opt_state = restored["params"], restored["opt_state"]
            start = latest
            history_path = os.path.join(checkpoint_dir, "history.json")
            if os.path.exists(history_path):
                with open(history_path) as f:
                    history = [h for h in json.load(f) if h["step"] <= start]
    key = jax.random.key(config.seed)
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    tokens_per_step = config.batch_size * mc.context_length
    t_last, last_step = time.perf_counter(), start
    for step in range(start, config.steps):
        x, y = get_batch(split.train, mc.context_length, config.batch_size, config.seed, step)
        params, opt_state, loss, grad_norm = train_step(params, opt_state, x, y, jax.random.fold_in(key, step))
        done = step + 1
        record = None
        if done % config.eval_interval == 0 or done == config.steps or done == start + 1:
            loss_value = float(loss)  # waits for the step: the timing below covers real work
            now = time.perf_counter()
            record = {
                "step": done,
                "loss": loss_value,
                "grad_norm": float(grad_norm),
                "lr": schedule_lr(step),
                "tokens_per_s": (done - last_step) * tokens_per_step / (now - t_last),
            }
            if done % config.eval_interval == 0 or done == config.steps:
                record["val_loss"] = estimate_loss(
                    eval_loss, params, split.val, mc.context_length, config.batch_size, config.eval_batches, config.seed
                )
            t_last, last_step = time.perf_counter(), done
            history.append(record)
            if log is not None:
                log(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                val=f"{record.get('val_loss', float('nan')):.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
        bar.update(1)
        if manager is not None and (done % config.checkpoint_interval == 0 or done == config.steps):
            manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
            manager.wait_until_finished()
            with open(os.path.join(checkpoint_dir, "history.json"), "w") as f:
                json.dump(history, f, indent=1)
    bar.close()
    if manager is not None:
        manager.close()
    trained = nnx.merge(eval_def, params)
    return trained, history
