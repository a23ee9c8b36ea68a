"""Training with optax: AdamW, warmup + cosine schedule, gradient clipping, dropout, orbax resume.

The compiled step takes the parameters and optimizer state as traced (donated) arguments; the
model structure (graphdef) and the optimizer are closed over, so the step compiles once per
(model config, TrainConfig, batch shape): changing any of them recompiles, nothing else does.
Batches and dropout keys are pure functions of (seed, step), which is what makes a resumed run
reproduce an uninterrupted one exactly.

Data parallelism (jaxgpt/sharding.py): `fit` trains over every device by default. Parameters
and optimizer state are replicated, each global batch is split by rows over a 1-D "data" mesh,
and the step is the same jitted function with input/output shardings: XLA partitions it and
the gradient mean over the whole batch becomes an all-reduce that the compiler inserts (the
loss is a mean over a sharded batch; nothing is averaged by hand). Dropout masks are drawn
for the global batch from the same key, so they do not depend on the device count (JAX's
random values never depend on sharding; with `jax_threefry_partitionable`, the default, each
device draws only its own rows' bits). The loss trajectory therefore matches a single-device
run up to float summation order (tests/test_sharding.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.data import Split, get_batch
from jaxgpt.engine import EIGEN_DOTS
from jaxgpt.model import GPT
from jaxgpt.runs import HISTORY_FILE, open_run
from jaxgpt.validation import integer, number, positive_int


# XLA:CPU's matrix products for the training step: its default library (YNNPACK) is the faster
# one for small steps, Eigen's from this many token rows per device on (B x T per device;
# benchmarks/results/onnx_notes.md and train_step_cpu.md have the figures).
EIGEN_DOTS_MIN_ROWS = 4096


def step_compiler_options(mesh=None, tokens: int | None = None) -> dict | None:
    """XLA compiler options of a step over `tokens` (B x T) on `mesh` (None: the default device);
    None (the compiler's defaults) when `tokens` is None."""
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    rows = None if tokens is None else tokens // (1 if mesh is None else mesh.size)
    if platform == "cpu" and rows is not None and rows >= EIGEN_DOTS_MIN_ROWS:
        return dict(EIGEN_DOTS)
    return None


class DataParallelError(ValueError):
    """The requested devices cannot split the batch (or leave out processes of a multi-host run)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters. Changing any of them recompiles the train step.

    `eval_interval`, `eval_batches`, `checkpoint_interval` and `log_interval` only decide what
    is measured and saved when; the others (`NUMERIC_FIELDS`) decide the trained weights.
    """

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
    log_interval: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval", "log_interval"):
            positive_int(getattr(self, name), f"TrainConfig.{name}")
        integer(self.warmup_steps, "TrainConfig.warmup_steps", low=0)
        integer(self.seed, "TrainConfig.seed", low=0)
        for name, low_open in (("learning_rate", True), ("min_learning_rate", False), ("grad_clip", True),
                               ("weight_decay", False)):
            number(getattr(self, name), f"TrainConfig.{name}", low=0.0, low_open=low_open)
        for name in ("beta1", "beta2"):
            number(getattr(self, name), f"TrainConfig.{name}", 0.0, 1.0, high_open=True)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def numeric(self) -> dict:
        """The fields that decide the trained weights (`NUMERIC_FIELDS`), by name."""
        return {name: getattr(self, name) for name in NUMERIC_FIELDS}


NUMERIC_FIELDS = ("steps", "batch_size", "learning_rate", "min_learning_rate", "warmup_steps", "weight_decay",
                  "beta1", "beta2", "grad_clip", "seed")


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_learning_rate` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.min_learning_rate,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule; weight decay on matrices/embeddings only."""
    # Decay matrices and embeddings only (as nanoGPT): biases and LayerNorm scales keep their scale.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(make_schedule(config), b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )


def cross_entropy(logits, targets):
    """Mean next-character loss in nats. logits `(B, T, V)`, targets int `(B, T)`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh=None, *,
                    tokens: int | None = None) -> Callable:
    """Returns jitted `step(params, opt_state, x, y, key) -> (params, opt_state, loss, grad_norm)`.

    `graphdef` must come from a model in training mode (dropout on). `params` and `opt_state`
    are donated: pass the returned ones to the next call.

    `tokens` (B x T of the batches it will be called with) picks the compiler options for
    that size (`step_compiler_options`: on the CPU, which library does the matrix products);
    a step called with other shapes still works, compiled with the same options.

    With a `mesh` (`data_parallel_mesh`), the step is data-parallel: params, opt_state, key
    and the outputs are replicated, x and y `(B, T)` are split by rows over the "data" axis
    (pass them as global arrays with that sharding, or as numpy on a single process). The
    compiler derives the cross-device gradient mean from these shardings.
    """

    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            return cross_entropy(nnx.merge(graphdef, p)(x, rngs=key), y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    options = step_compiler_options(mesh, tokens)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1), compiler_options=options)
    whole, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(whole, whole, rows, rows, whole),
                   out_shardings=whole, compiler_options=options)


def make_eval_loss(graphdef, mesh=None, *, tokens: int | None = None) -> Callable:
    """Returns `loss(params, x, y) -> mean loss` (jitted) for a model graphdef in eval mode.

    With a `mesh`, numpy batches `(B, T)` are split by rows over its "data" axis first.
    `tokens`: as for `make_train_step`.
    """
    loss = lambda params, x, y: cross_entropy(nnx.merge(graphdef, params)(x), y)
    options = step_compiler_options(mesh, tokens)
    if mesh is None:
        return jax.jit(loss, compiler_options=options)
    whole, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    jitted = jax.jit(loss, in_shardings=(whole, rows, rows), out_shardings=whole, compiler_options=options)
    return lambda params, x, y: jitted(params, sharding.put_global_batch(x, rows), sharding.put_global_batch(y, rows))


def data_parallel_mesh(devices, batch_size: int, *, names: Mapping[str, str] | None = None):
    """The mesh `fit` trains on: a 1-D "data" mesh over the chosen devices of all processes.

    Args:
      devices: None for every device (`jax.devices()`: all processes); an int n for the
        first n (1: a single device); or a list of `jax.Device`. A multi-process run must use
        every device (each process runs the same program on its own devices).
      batch_size: the global batch, split evenly by rows.
      names: what messages call `devices` and `batch_size` (a CLI passes its flags).

    Raises:
      DataParallelError: the batch does not divide by the device count, or devices leaves
        out part of a multi-process run. (ValueError for a malformed `devices`.)
    """
    name = lambda key: (names or {}).get(key, key)
    mesh = sharding.data_mesh(devices, pool=jax.devices(), name=name("devices"))
    if jax.process_count() > 1 and mesh.size != jax.device_count():
        raise DataParallelError(f"{sharding.given(name('devices'), devices)}: a multi-process run trains on all "
                                f"{jax.device_count()} devices of its {jax.process_count()} processes; leave "
                                f"{name('devices')} unset")
    if batch_size % mesh.size:
        raise DataParallelError(f"{name('batch_size')} {batch_size} does not divide by the {mesh.size} devices of the "
                                f"data-parallel mesh: use a multiple of {mesh.size}, or fewer devices "
                                f"({sharding.given(name('devices'), 1)} trains on one)")
    return mesh


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


# ----------------------------------------------------------------------------- the loop's parts
class _GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, then raise KeyboardInterrupt.

    A second Ctrl-C interrupts at once. Only installed in the main thread (signals need it).
    """

    def __init__(self, enabled: bool):
        self.requested = False
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C is a plain interrupt

    def __enter__(self):
        if self._enabled:
            previous = signal.signal(signal.SIGINT, self._handler)
            # None: a handler installed outside Python; fall back to Python's KeyboardInterrupt.
            self._previous = previous if previous is not None else signal.default_int_handler
        return self

    def __exit__(self, *exc):
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous)


class _Throughput:
    """Training tokens/s since the clock last restarted (after compilation, evaluations, saves)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._time: float | None = None  # no window until the first (compiling) step is done
        self._step = 0

    @property
    def running(self) -> bool:
        return self._time is not None

    def restart(self, done: int) -> None:
        self._time, self._step = time.perf_counter(), done

    def rate(self, done: int) -> float | None:
        """Call once the device has finished step `done` (e.g. after reading its loss)."""
        if self._time is None:
            return None
        return (done - self._step) * self.tokens_per_step / (time.perf_counter() - self._time)


class _ProgressBar:
    """A tqdm bar over the steps showing the latest loss, validation loss and tokens/s."""

    def __init__(self, steps: int, start: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=steps, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
        self._postfix: dict[str, str] = {}

    def show(self, record: dict) -> None:
        if "val_loss" in record:
            self._postfix["val"] = f"{record['val_loss']:.3f}"
        self._postfix["loss"] = f"{record['loss']:.3f}"
        if record["tokens_per_s"] is not None:
            self._postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self._bar.set_postfix(self._postfix, refresh=False)

    def update(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _history_record(done: int, loss, grad_norm, lr: float, clock: _Throughput) -> dict:
    """One history record of step `done` (waits for the device, so the clock timed real work)."""
    loss_value = float(loss)
    return {"step": done, "loss": loss_value, "grad_norm": float(grad_norm), "lr": lr,
            "tokens_per_s": clock.rate(done)}


# ----------------------------------------------------------------------------- the loop
def fit(
    model: GPT,
    split: Split,
    config: TrainConfig,
    *,
    checkpoint_dir: str | None = None,
    history_path: str | None = None,
    run_info: dict | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[int, list[dict]], None] | None = None,
    devices=None,
) -> tuple[GPT, list[dict]]:
    """Trains a copy of `model`'s parameters; returns (trained model, history).

    On CPU, call `jaxgpt.reuse_host_memory()` first thing in the program (as `jaxgpt train`
    does), so that XLA's per-step scratch buffer is not page-faulted afresh every step.

    Every `log_interval` steps (and at evaluations and the last step) the loop waits for the
    device and records the step's training loss, gradient norm, learning rate and the measured
    training throughput (tokens/s over the steps since the previous record, excluding
    compilation, evaluation and checkpoint time); every `eval_interval` steps and at the end it
    adds the validation loss (`eval_batches` fixed batches of the validation split).

    With `checkpoint_dir`, an orbax checkpoint (params, optimizer state) is written every
    `checkpoint_interval` steps, at the end, and when Ctrl-C is pressed (the step in flight
    finishes, the checkpoint is written, then KeyboardInterrupt is raised); training resumes
    from the latest one found there. Batches and dropout keys depend only on (seed, step), so
    the resumed run computes exactly what the uninterrupted one would have, and its history
    records are identical (throughput aside). `run.json` beside the checkpoints records the
    model config, the numeric TrainConfig fields and `run_info`; resuming with different ones
    raises ResumeError.

    Data-parallel over every device by default (see the module docstring); the history and
    checkpoints of a run on n devices match a single-device run up to float summation order,
    so a run may be resumed on another device count. On a multi-process run (after
    `jaxgpt.sharding.initialize_distributed`), every process calls `fit` alike; orbax
    coordinates the checkpoint writes (all processes take part, which needs a
    `checkpoint_dir` every host can reach), while `run.json`, the history file and the
    progress bar come from process 0 only.

    Args:
      model: the initial model (not modified; its parameters are copied).
      split: training and validation token arrays.
      config: optimisation settings.
      checkpoint_dir: orbax checkpoint directory (created if needed), or None.
      history_path: where the history JSON is kept (default `checkpoint_dir/history.json`).
      run_info: JSON-serialisable facts that must match on resume (e.g. a hash of the text).
      progress: show a tqdm bar with loss, validation loss, tokens/s and ETA.
      log: called with each history record.
      on_checkpoint: called with (step, history) after each checkpoint is written.
      devices: None (every device), a device count, or a list of devices; see
        `data_parallel_mesh`. `config.batch_size` must divide by their number.

    Returns:
      The model in eval mode with the trained parameters, and a list of history records
      `{"step", "loss", "grad_norm", "lr", "tokens_per_s" (None right after (re)start), "val_loss"?}`.

    Raises:
      ResumeError: `checkpoint_dir` holds a different run, or one beyond `config.steps`.
      DataParallelError: the batch does not divide by the number of devices.
      KeyboardInterrupt: after the checkpoint of an interrupted run is written.
    """
    mc: GPTConfig = model.config
    mesh = data_parallel_mesh(devices, config.batch_size)
    whole, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    primary = sharding.is_primary_process()
    was_training = model.training
    train_def, eval_def, params = split_modes(model)
    if was_training:
        model.train()
    # A copy (the step donates its inputs: keep the caller's model intact), replicated.
    params = sharding.put_replicated(params, whole)
    tx = make_optimizer(config)
    opt_state = jax.jit(tx.init, out_shardings=whole)(params)
    train_step = make_train_step(train_def, tx, mesh, tokens=config.batch_size * mc.context_length)
    eval_loss = make_eval_loss(eval_def, mesh, tokens=config.batch_size * mc.context_length)
    schedule = make_schedule(config)
    checkpoints, start, history = None, 0, []
    if checkpoint_dir is not None:
        if history_path is None:
            history_path = os.path.join(checkpoint_dir, HISTORY_FILE)
        checkpoints, start, params, opt_state, history = open_run(
            checkpoint_dir, history_path, on_checkpoint, primary, mc, config, run_info, params, opt_state)

    # Made replicated (on every process); fold_in on it then runs on every device, no transfer per step.
    key = jax.jit(lambda: jax.random.key(config.seed), out_shardings=whole)()
    clock = _Throughput(config.batch_size * mc.context_length)
    bar = _ProgressBar(config.steps, start, enabled=progress and primary)

    def batch(step: int):
        x, y = get_batch(split.train, mc.context_length, config.batch_size, config.seed, step)
        return sharding.put_global_batch(x, rows), sharding.put_global_batch(y, rows)

    def record(done: int, loss, grad_norm, params) -> None:
        """History: step `done`'s record (the validation loss too at evaluation steps)."""
        entry = _history_record(done, loss, grad_norm, float(schedule(done - 1)), clock)
        if done % config.eval_interval == 0 or done == config.steps:
            entry["val_loss"] = estimate_loss(eval_loss, params, split.val, mc.context_length, config.batch_size,
                                              config.eval_batches, config.seed)
        history.append(entry)
        if log is not None:
            log(entry)
        bar.show(entry)

    try:
        with _GracefulStop(enabled=checkpoints is not None) as stop:
            for step in range(start, config.steps):
                params, opt_state, loss, grad_norm = train_step(params, opt_state, *batch(step),
                                                                jax.random.fold_in(key, step))
                done = step + 1
                if done % config.log_interval == 0 or done % config.eval_interval == 0 or done == config.steps:
                    record(done, loss, grad_norm, params)
                    clock.restart(done)
                elif not clock.running:
                    loss.block_until_ready()  # the first step compiled: start the clock after it
                    clock.restart(done)
                bar.update()
                if checkpoints is not None and (done % config.checkpoint_interval == 0 or done == config.steps
                                                or stop.requested):
                    checkpoints.save(done, params, opt_state, history)
                    clock.restart(done)
                if stop.requested:
                    raise KeyboardInterrupt(f"stopped at step {done}; checkpoint saved in {checkpoint_dir}")
    finally:
        bar.close()
        if checkpoints is not None:
            checkpoints.close()
    return nnx.merge(eval_def, params), history
