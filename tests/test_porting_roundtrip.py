"""Round trips: torch -> Flax -> torch bit-exact, every file format, strict loading, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import porting
from jaxgpt import GPT, GPTConfig
from porting import keymap
from tests.porting_helpers import PUBLISHED, SMALL, bits, jitted_logits, one_torch_thread, random_reference, save_reference  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")

CONFIGS = [
    ("drake", PUBLISHED),
    ("learning", PUBLISHED),
    ("drake", SMALL),
    ("learning", dict(vocab_size=50, context_length=24, model_dim=48, num_blocks=3, num_heads=8)),
    ("drake", dict(vocab_size=11, context_length=5, model_dim=6, num_blocks=2, num_heads=6)),  # head_size 1
    ("learning", dict(vocab_size=2, context_length=1, model_dim=4, num_blocks=12, num_heads=1)),
]
IDS = [f"{v}-V{c['vocab_size']}-C{c['context_length']}-D{c['model_dim']}-N{c['num_blocks']}-H{c['num_heads']}"
       for v, c in CONFIGS]


def assert_state_dicts_equal(ours, theirs) -> None:
    """Same keys in the same order, same dtypes, bit-identical values."""
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype == torch.float32, key
        assert torch.equal(ours[key], theirs[key]), key
        np.testing.assert_array_equal(bits(ours[key]), bits(theirs[key]))


@pytest.mark.parametrize("variant,config", CONFIGS, ids=IDS)
def test_torch_flax_torch_bit_exact(tmp_path, variant, config):
    reference = save_reference(tmp_path / "in.pt", variant, seed=21, **config)
    model = porting.load_weights(tmp_path / "in.pt")
    assert model.config == GPTConfig(**config, variant=variant)
    assert not model.training
    porting.save_weights(model, tmp_path / "out.pt")
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert_state_dicts_equal(state, reference.state_dict())
    fresh = random_reference(variant, seed=99, **config)
    fresh.load_state_dict(state, strict=True)


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_save_weights_of_a_jax_model_loads_strictly_and_agrees(tmp_path, variant):
    """A model that never came from torch: the notebook's class loads it and computes the same logits."""
    from porting.torch_reference import make_reference

    config = GPTConfig(vocab_size=9, context_length=12, model_dim=20, num_blocks=2, num_heads=4, variant=variant)
    rng = np.random.default_rng(5)  # random Flax parameters (GPT's own init runs eagerly and slowly)
    params = {k: rng.normal(0.0, 0.3, s).astype(np.float32) for k, s in keymap.layout(config, "flax").items()}
    model = porting.model_from_params(params, config)
    porting.save_weights(model, tmp_path / "jax.pt")
    reference = make_reference(variant, vocab_size=9, context_length=12, model_dim=20, num_blocks=2, num_heads=4)
    reference.load_state_dict(torch.load(tmp_path / "jax.pt", weights_only=True), strict=True)
    tokens = np.random.default_rng(0).integers(0, 9, size=(2, 12))
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(jitted_logits(model)(tokens), expected, atol=1e-5, rtol=0)
    # and the Flax parameters come back exactly
    again = porting.params_from_model(porting.load_weights(tmp_path / "jax.pt"))
    assert again.keys() == params.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(again[key], value)


@pytest.mark.parametrize("fmt", ["safetensors", "torch-safetensors", "orbax"])
@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_convert_through_every_format_and_back_is_exact(tmp_path, fmt, variant):
    config = dict(vocab_size=13, context_length=10, model_dim=12, num_blocks=2, num_heads=2)
    reference = save_reference(tmp_path / "in.pt", variant, seed=31, **config)
    middle = tmp_path / ("mid" if fmt == "orbax" else "mid.safetensors")
    porting.convert(tmp_path / "in.pt", middle, fmt)
    checkpoint = porting.read_checkpoint(middle)
    assert checkpoint.config == GPTConfig(**config, variant=variant)
    assert checkpoint.scheme == ("torch" if fmt == "torch-safetensors" else "flax")
    assert checkpoint.num_params == GPTConfig(**config, variant=variant).num_params()
    porting.convert(middle, tmp_path / "back.pt")
    assert_state_dicts_equal(torch.load(tmp_path / "back.pt", weights_only=True), reference.state_dict())


def test_half_precision_checkpoints_load_exactly_widened(tmp_path):
    reference = random_reference("drake", seed=41, **SMALL)
    for dtype in (torch.float16, torch.bfloat16):
        state = {k: v.to(dtype) for k, v in reference.state_dict().items()}
        torch.save(state, tmp_path / "half.pt")
        checkpoint = porting.read_checkpoint(tmp_path / "half.pt")
        assert checkpoint.dtypes == {str(dtype).removeprefix("torch."): len(state)}
        porting.save_weights(porting.load_weights(tmp_path / "half.pt"), tmp_path / "wide.pt")
        wide = torch.load(tmp_path / "wide.pt", weights_only=True)
        assert_state_dicts_equal(wide, {k: v.float() for k, v in state.items()})


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_keymap_table_matches_both_models(variant):
    """The table's shapes and order are those of the torch reference and of jaxgpt.GPT."""
    from flax import nnx

    config = GPTConfig(vocab_size=5, context_length=6, model_dim=8, num_blocks=3, num_heads=2, variant=variant)
    reference = random_reference(variant, **{k: getattr(config, k) for k in SMALL})
    torch_layout = keymap.layout(config, "torch")
    assert list(torch_layout) == list(reference.state_dict())
    assert torch_layout == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    flax_shapes = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert keymap.layout(config, "flax") == flax_shapes
    assert sum(np.prod(s) for s in torch_layout.values()) == config.num_params()


def test_aligned_arrays_are_aligned_and_disjoint():
    shapes = [(3,), (5, 7), (1,), (2, 3, 4), (0, 4), (16,)]
    arrays = keymap.aligned_arrays(shapes)
    assert [a.shape for a in arrays] == shapes and all(a.dtype == np.float32 for a in arrays)
    assert all(a.ctypes.data % keymap.ALIGNMENT == 0 and a.flags.c_contiguous for a in arrays if a.size)
    for n, a in enumerate(arrays):
        a[...] = n
    assert all((a == n).all() for n, a in enumerate(arrays))


def test_model_from_params_copies_what_it_is_given():
    """XLA:CPU adopts an aligned float32 host array as its buffer: a caller's later write to
    its own arrays must not reach the model."""
    config = GPTConfig(**SMALL)
    shapes = keymap.layout(config, "flax")
    params = dict(zip(shapes, keymap.aligned_arrays(list(shapes.values()))))  # adoptable as they are
    for n, value in enumerate(params.values()):
        value[...] = n
    model = porting.model_from_params(params, config)
    for value in params.values():
        value[...] = -1.0
    got = porting.params_from_model(model)
    assert all((got[name] == n).all() for n, name in enumerate(params))


def test_fused_kernels_hold_each_head_where_the_docs_say():
    """qkv[:, c, j, :] is head j's query/key/value weight transposed; out_kernel is compute.weight.T split by head."""
    config = GPTConfig(vocab_size=3, context_length=4, model_dim=6, num_blocks=1, num_heads=2)
    state = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) + 1000 * n
             for n, (k, s) in enumerate(keymap.layout(config, "torch").items())}
    params = keymap.params_from_state_dict(state, config)
    head = "transformer_blocks.0.mhsa.attention_heads.{j}.{c}_layer.weight"
    for j in range(2):
        for c, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(params["blocks.0.attention.qkv"][:, c, j, :], state[head.format(j=j, c=name)].T)
    compute = state["transformer_blocks.0.mhsa.compute.weight"]  # [D_out, D_in]
    np.testing.assert_array_equal(params["blocks.0.attention.out_kernel"][1, 2], compute[:, 1 * 3 + 2])


# ----------------------------------------------------------------------------- atomic writes
def _no_temporaries(directory) -> None:
    assert [n for n in os.listdir(directory) if n.endswith(".tmp")] == []


def test_failed_torch_save_leaves_no_partial_file(tmp_path, monkeypatch):
    save_reference(tmp_path / "in.pt", "drake")
    model = porting.load_weights(tmp_path / "in.pt")
    (tmp_path / "existing.pt").write_bytes(b"old contents")

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    for name in ("new.pt", "existing.pt"):
        with pytest.raises(OSError, match="No space left"):
            porting.save_weights(model, tmp_path / name)
    assert not (tmp_path / "new.pt").exists()
    assert (tmp_path / "existing.pt").read_bytes() == b"old contents"
    _no_temporaries(tmp_path)


def test_failed_safetensors_and_orbax_writes_leave_nothing(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    import safetensors.numpy

    save_reference(tmp_path / "in.pt", "learning")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    monkeypatch.setattr(ocp.Checkpointer, "save", broken)
    with pytest.raises(OSError):
        porting.convert(tmp_path / "in.pt", tmp_path / "out.safetensors")
    with pytest.raises(OSError):
        porting.convert(tmp_path / "in.pt", tmp_path / "out_dir")
    assert sorted(os.listdir(tmp_path)) == ["in.pt"]


def test_output_directory_must_exist(tmp_path):
    save_reference(tmp_path / "in.pt", "drake")
    with pytest.raises(porting.CheckpointError, match="cannot write: directory .* does not exist"):
        porting.convert(tmp_path / "in.pt", tmp_path / "no" / "out.pt")
    os.mkdir(tmp_path / "taken")
    with pytest.raises(porting.CheckpointError, match="taken: cannot write a checkpoint directory: the path already exists"):
        porting.convert(tmp_path / "in.pt", tmp_path / "taken", "orbax")


def test_many_heads_few_keys_in_flax_files(tmp_path):
    """Flax files hold all heads in one kernel: 16 heads with only 15 keys is a valid model."""
    config = dict(vocab_size=3, context_length=2, model_dim=16, num_blocks=1, num_heads=16)
    reference = save_reference(tmp_path / "in.pt", "learning", seed=61, **config)
    porting.convert(tmp_path / "in.pt", tmp_path / "heads.safetensors")
    assert len(porting.read_state_dict(tmp_path / "heads.safetensors")) == 15
    assert porting.read_checkpoint(tmp_path / "heads.safetensors").config == GPTConfig(**config, variant="learning")
    porting.convert(tmp_path / "heads.safetensors", tmp_path / "back.pt")
    assert_state_dicts_equal(torch.load(tmp_path / "back.pt", weights_only=True), reference.state_dict())
