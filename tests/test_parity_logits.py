"""Parity: torch checkpoints this project never saw, ported with the config inferred, give
logits within 1e-5 (float32, CPU) of the independent torch implementation in the notebooks'
structure (per-head modules), for both variants, several configs, batch sizes 1..3 and every
length 1..context_length."""

from __future__ import annotations

import numpy as np
import pytest

import porting
from jaxgpt import GPTConfig
from tests.porting_helpers import PUBLISHED, SMALL, jitted_logits, one_torch_thread, save_reference  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")

TOLERANCE = 1e-5

# Every length 1..context_length, batch sizes cycling 1..3: one compilation per length, with the
# cheaper XLA backend optimisation (FAST_COMPILE); the published-config tests use the default one.
SWEEP = [
    ("drake", SMALL, 101),
    ("learning", SMALL, 102),
    ("drake", dict(vocab_size=50, context_length=12, model_dim=48, num_blocks=3, num_heads=8), 103),
    ("learning", dict(vocab_size=50, context_length=12, model_dim=48, num_blocks=3, num_heads=8), 104),
    ("drake", dict(vocab_size=11, context_length=8, model_dim=6, num_blocks=2, num_heads=6), 105),  # head_size 1
    ("learning", dict(vocab_size=104, context_length=10, model_dim=36, num_blocks=2, num_heads=1), 106),  # one head
]
SWEEP_IDS = [f"{v}-V{c['vocab_size']}-C{c['context_length']}-D{c['model_dim']}-N{c['num_blocks']}-H{c['num_heads']}"
             for v, c, _ in SWEEP]


def ported(tmp_path, variant, config, seed, fast_compile=False):
    """A random torch reference saved with torch.save(state_dict()), and load_weights of that file."""
    reference = save_reference(tmp_path / "ref.pt", variant, seed=seed, **config)
    model = porting.load_weights(tmp_path / "ref.pt")
    assert model.config == GPTConfig(**config, variant=variant)  # inferred, not given
    return reference, jitted_logits(model, fast_compile)


def compare(reference, logits_fn, tokens: np.ndarray) -> float:
    """Max |logit difference|; also checks the greedy choice wherever it is not a near tie."""
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).numpy()
    got = logits_fn(tokens)
    assert got.shape == expected.shape
    diff = float(np.max(np.abs(got - expected)))
    top2 = np.sort(expected, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 10 * TOLERANCE  # a 1e-5 wobble may flip a near tie
    np.testing.assert_array_equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])
    return diff


@pytest.mark.parametrize("variant,config,seed", SWEEP, ids=SWEEP_IDS)
def test_every_length_and_batch_size(tmp_path, variant, config, seed):
    reference, logits_fn = ported(tmp_path, variant, config, seed, fast_compile=True)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for t in range(1, config["context_length"] + 1):
        batch = 1 + t % 3
        tokens = rng.integers(0, config["vocab_size"], size=(batch, t))
        worst = max(worst, compare(reference, logits_fn, tokens))
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_published_config_selected_lengths(tmp_path, variant):
    reference, logits_fn = ported(tmp_path, variant, PUBLISHED, seed=7)
    rng = np.random.default_rng(7)
    for t, batch in ((1, 3), (2, 1), (57, 2), (127, 1), (128, 3)):
        tokens = rng.integers(0, 104, size=(batch, t))
        assert compare(reference, logits_fn, tokens) <= TOLERANCE, t


@pytest.mark.slow
def test_published_config_every_length(tmp_path):
    """The published configuration and variant at all 128 lengths, batch 1.

    One compilation per length dominates the run time (hence the cheaper XLA backend
    optimisation, see FAST_COMPILE); the learning variant's every-length sweep is covered by
    the small configurations above, its published configuration by the selected lengths.
    """
    reference, logits_fn = ported(tmp_path, "drake", PUBLISHED, seed=8, fast_compile=True)
    tokens = np.random.default_rng(8).integers(0, 104, size=(1, 128))
    worst = max(compare(reference, logits_fn, tokens[:, :t]) for t in range(1, 129))
    assert worst <= TOLERANCE, worst
