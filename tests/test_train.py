"""The data pipeline, the optimizer and the training loop: learning, history, exact resume.

All on a toy configuration (C = 16, D = 32) and a small synthetic corpus so that every
training run takes seconds; each run still compiles the real train step.
"""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.data import DataError, get_batch, train_val_split
from jaxgpt.model import GPT
from jaxgpt.runs import ResumeError, check_resumable
from jaxgpt.train import (
    EIGEN_DOTS_MIN_ROWS,
    TrainConfig,
    fit,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_modes,
)
from jaxgpt.vocab import default_vocab

CONFIG = GPTConfig(context_length=16, model_dim=32, num_blocks=2, num_heads=2)
TRAIN = TrainConfig(steps=40, batch_size=16, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=5,
                    eval_interval=10, eval_batches=4, checkpoint_interval=10, log_interval=5, seed=0)
LINES = (
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n",
    "Or to take arms against a sea of troubles\n",
    "And by opposing end them. To die: to sleep;\n",
)


def corpus(chars: int = 40_000, seed: int = 0) -> str:
    """Lines of Hamlet in a seeded random order: learnable structure, no data files needed."""
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < chars:
        line = LINES[rng.integers(len(LINES))]
        out.append(line)
        n += len(line)
    return "".join(out)[:chars]


@pytest.fixture(scope="module")
def split():
    return train_val_split(default_vocab().encode(corpus()), 0.1, CONFIG.context_length)


def strip(history):
    """History without the measured throughput (the only field that is not a pure function of the run)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def uninterrupted(split, tmp_path_factory):
    """One complete checkpointed run: (model, history, checkpoint dir)."""
    directory = str(tmp_path_factory.mktemp("uninterrupted"))
    model, history = fit(GPT(CONFIG, rngs=nnx.Rngs(0)), split, TRAIN, checkpoint_dir=directory, progress=False)
    return model, history, directory


# ----------------------------------------------------------------------------- data
def test_get_batch_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.int32)
    x, y = get_batch(tokens, 16, 8, seed=3, step=5)
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # consecutive ids: the target is the next character
    np.testing.assert_array_equal(x[:, 1:], x[:, :-1] + 1)  # each row is a contiguous window
    assert x.min() >= 0 and y.max() <= 999


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.int32)
    a = get_batch(tokens, 32, 4, seed=1, step=7)
    np.testing.assert_array_equal(a[0], get_batch(tokens, 32, 4, seed=1, step=7)[0])
    assert not np.array_equal(a[0], get_batch(tokens, 32, 4, seed=1, step=8)[0])
    assert not np.array_equal(a[0], get_batch(tokens, 32, 4, seed=2, step=7)[0])


def test_train_val_split_holds_out_the_end():
    tokens = np.arange(1000, dtype=np.int32)
    s = train_val_split(tokens, 0.1, 16)
    np.testing.assert_array_equal(np.concatenate([s.train, s.val]), tokens)
    assert len(s.val) == 100
    with pytest.raises(DataError, match="validation part has 10 characters"):
        train_val_split(tokens, 0.01, 16)
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(tokens, 1.0, 16)


# ----------------------------------------------------------------------------- optimizer
def test_schedule_warms_up_then_decays_to_the_minimum():
    cfg = TrainConfig(steps=100, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10)
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(100)) == pytest.approx(1e-4)
    assert float(lr(55)) < float(lr(30))


def test_weight_decay_applies_to_matrices_only():
    cfg = TrainConfig(steps=10, learning_rate=1e-2, warmup_steps=0, weight_decay=0.5)
    tx = make_optimizer(cfg)
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -1e-2 * 0.5, rtol=1e-6)  # -lr * wd * p
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_gradients_are_clipped_before_adam():
    """Clipped to norm 1, gradients 100 then 1 (per element, 4 elements) both become 0.5: Adam must
    then move exactly as with two gradients of 0.5."""
    tx = make_optimizer(TrainConfig(steps=10, grad_clip=1.0, warmup_steps=0, weight_decay=0.0))
    params = {"w": jnp.zeros((4,))}

    def second_update(g1, g2):
        state = tx.init(params)
        _, state = tx.update({"w": jnp.full((4,), g1)}, state, params)
        return tx.update({"w": jnp.full((4,), g2)}, state, params)[0]["w"]

    np.testing.assert_allclose(second_update(100.0, 1.0), second_update(0.5, 0.5), rtol=1e-6)
    assert not np.allclose(second_update(100.0, 0.1), second_update(0.5, 0.5), rtol=1e-3)  # 0.1 is not clipped


def test_train_step_compiles_once_and_uses_dropout(split):
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    train_def, _, params = split_modes(model)
    tx = make_optimizer(TRAIN)
    step = make_train_step(train_def, tx)
    key = jax.random.key(0)
    x, y = get_batch(split.train, 16, 4, 0, 0)
    copy = lambda t: jax.tree.map(jnp.copy, t)
    p0, o0 = copy(params), tx.init(params)
    _, _, loss_a, _ = step(copy(p0), copy(o0), x, y, jax.random.fold_in(key, 0))
    _, _, loss_b, _ = step(copy(p0), copy(o0), x, y, jax.random.fold_in(key, 1))
    _, _, loss_c, _ = step(copy(p0), copy(o0), *get_batch(split.train, 16, 4, 0, 1), jax.random.fold_in(key, 0))
    assert float(loss_a) != float(loss_b)  # another dropout key, another mask
    assert step._cache_size() == 1  # new batches and keys never recompile


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a choice of XLA:CPU's matrix-product library")
def test_large_cpu_steps_take_eigens_products_and_agree_with_the_default(split):
    model = GPT(GPTConfig(context_length=16, model_dim=32, num_blocks=1, num_heads=2), rngs=nnx.Rngs(0))
    train_def, _, params = split_modes(model)
    tx = make_optimizer(TRAIN)
    batch = EIGEN_DOTS_MIN_ROWS // CONFIG.context_length
    x, y = get_batch(split.train, CONFIG.context_length, batch, 0, 0)
    key = jax.random.key(0)
    results, programs = [], []
    for tokens in (None, batch * CONFIG.context_length):  # the compiler's defaults, then this size's options
        step = make_train_step(train_def, tx, tokens=tokens)
        p, o = jax.tree.map(jnp.copy, params), tx.init(params)
        compiled = step.lower(p, o, x, y, key).compile()
        programs.append(compiled.as_text())
        results.append(compiled(p, o, x, y, key))
    assert "ynn" in programs[0] and "ynn" not in programs[1]  # YNNPACK fusions by default, none at this size
    (p0, _, loss0, _), (p1, _, loss1, _) = results
    assert abs(float(loss0) - float(loss1)) <= 1e-6
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ----------------------------------------------------------------------------- fit
def test_loss_decreases_within_a_few_dozen_steps(uninterrupted):
    _, history, _ = uninterrupted
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert len(val) == 4  # steps 10, 20, 30, 40
    assert val[-1] < val[0] - 0.3
    assert val[-1] < np.log(CONFIG.vocab_size) - 1.0  # far below a uniform guess
    assert history[-1]["loss"] < history[0]["loss"] - 0.5


def test_history_records(uninterrupted):
    _, history, directory = uninterrupted
    assert [r["step"] for r in history] == list(range(5, 41, 5))
    schedule = make_schedule(TRAIN)
    for r in history:
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)))
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert ("val_loss" in r) == (r["step"] % TRAIN.eval_interval == 0)
    # Throughput is measured after the first (compiling) step, once the device is done.
    assert all(r["tokens_per_s"] is None or r["tokens_per_s"] > 0 for r in history)
    assert any(r["tokens_per_s"] for r in history)
    with open(os.path.join(directory, "history.json")) as f:
        assert strip(json.load(f)) == strip(history)


def test_fit_leaves_the_callers_model_untouched(split):
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    before = leaves(model)
    trained, _ = fit(model, split, TRAIN.replace(steps=2, log_interval=1), progress=False)
    for a, b in zip(before, leaves(model)):
        np.testing.assert_array_equal(a, b)
    assert not model.training and not trained.training
    assert any(not np.array_equal(a, b) for a, b in zip(before, leaves(trained)))


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(split, uninterrupted, tmp_path):
    """Ctrl-C at step 15 (between checkpoints): checkpoint written, run resumed, same numbers."""
    model_a, history_a, _ = uninterrupted
    directory = str(tmp_path / "run")

    def interrupt(record):
        if record["step"] == 15:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: the loop finishes the step

    with pytest.raises(KeyboardInterrupt):
        fit(GPT(CONFIG, rngs=nnx.Rngs(0)), split, TRAIN, checkpoint_dir=directory, progress=False, log=interrupt)
    assert check_resumable(directory, CONFIG, TRAIN) == 15
    model_b, history_b = fit(GPT(CONFIG, rngs=nnx.Rngs(0)), split, TRAIN, checkpoint_dir=directory, progress=False)
    assert strip(history_b) == strip(history_a)  # exact equality, every loss of every record
    for a, b in zip(leaves(model_a), leaves(model_b)):
        np.testing.assert_array_equal(a, b)


def test_last_step_is_checkpointed_and_a_finished_run_is_not_retrained(split, uninterrupted, tmp_path):
    _, history_a, _ = uninterrupted
    directory = str(tmp_path / "odd")
    cfg = TRAIN.replace(steps=7, checkpoint_interval=5)
    fit(GPT(CONFIG, rngs=nnx.Rngs(0)), split, cfg, checkpoint_dir=directory, progress=False)
    assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["5", "7"]
    calls = []
    _, history = fit(GPT(CONFIG, rngs=nnx.Rngs(0)), split, cfg, checkpoint_dir=directory, progress=False,
                     log=calls.append)
    assert calls == [] and history[-1]["step"] == 7


def test_resuming_with_other_settings_is_refused(split, uninterrupted):
    _, _, directory = uninterrupted
    with pytest.raises(ResumeError, match=r"seed 0 \(now 1\)"):
        fit(GPT(CONFIG), split, TRAIN.replace(seed=1), checkpoint_dir=directory, progress=False)
    with pytest.raises(ResumeError, match=r"model_dim 32 \(now 64\)"):
        check_resumable(directory, CONFIG.replace(model_dim=64), TRAIN)
    with pytest.raises(ResumeError, match="text_sha256"):
        check_resumable(directory, CONFIG, TRAIN, {"text_sha256": "other"})
    # What only changes reporting may differ.
    assert check_resumable(directory, CONFIG, TRAIN.replace(eval_interval=7, log_interval=3)) == 40


# ----------------------------------------------------------------------------- against torch
@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_first_step_matches_the_notebook_models_torch_step(variant):
    """Same weights, same batch, dropout off: loss, every gradient and the clipped AdamW update agree."""
    pytest.importorskip("torch")
    from benchmarks.train_step import agreement

    result = agreement(GPT(CONFIG.replace(variant=variant), rngs=nnx.Rngs(5)), batch=4)
    assert result["loss_abs_diff"] <= 1e-5
    assert result["grad_max_abs_diff"] <= 1e-5 < result["grad_max_abs"]
    assert result["params_after_step_max_abs_diff_grad_ge_1e-6"] <= 1e-6
    # Where a gradient is ~ Adam's eps, float noise becomes a fraction of the learning rate.
    assert result["params_after_step_max_abs_diff"] <= 0.1 * result["learning_rate"]
    assert result["ok"]


@pytest.mark.parametrize("make, message", [
    (lambda: GPTConfig(num_heads=0), r"GPTConfig.num_heads must be a positive integer, got 0"),
    (lambda: GPTConfig(vocab_size=True), r"GPTConfig.vocab_size must be an integer, got True"),
    (lambda: GPTConfig(dropout=1.0), r"GPTConfig.dropout must be a finite number in \[0, 1\), got 1.0"),
    (lambda: TrainConfig(steps=0), r"TrainConfig.steps must be a positive integer, got 0"),
    (lambda: TrainConfig(warmup_steps=-1), r"TrainConfig.warmup_steps must be an integer >= 0, got -1"),
    (lambda: TrainConfig(learning_rate=0.0), r"TrainConfig.learning_rate must be a finite number in \(0, inf\)"),
    (lambda: TrainConfig(grad_clip=float("nan")), r"TrainConfig.grad_clip must be a finite number"),
    (lambda: TrainConfig(beta2=1.0), r"TrainConfig.beta2 must be a finite number in \[0, 1\), got 1.0"),
])
def test_configs_refuse_bad_values_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()
