"""Shared helpers of the porting tests: torch reference checkpoints with random (non-default)
values, bit-level comparison, and hand-made torch-like zip archives."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

PUBLISHED = dict(vocab_size=104, context_length=128, model_dim=252, num_blocks=6, num_heads=6)
SMALL = dict(vocab_size=7, context_length=16, model_dim=24, num_blocks=1, num_heads=3)


def random_reference(variant: str, seed: int = 0, **config):
    """A torch reference model (the notebook's structure) with every parameter random.

    Default initialisation leaves LayerNorm weights at 1 and biases at 0, which would hide a
    swapped scale/bias or a dropped bias; here every tensor gets its own random values.
    """
    import torch

    from porting.torch_reference import make_reference

    torch.manual_seed(seed)
    model = make_reference(variant, **config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif p.dim() == 1:  # LayerNorm weight
                p.normal_(1.0, 0.3)
            elif "embedding" in name:
                p.normal_(0.0, 1.0)
            else:  # Linear weight [out, in]: unit-scale outputs, peaked attention
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    return model.eval()


def save_reference(path, variant: str = "drake", seed: int = 0, **config):
    """Saves a random reference model's `state_dict()` to `path`; returns the model."""
    import torch

    model = random_reference(variant, seed, **(config or SMALL))
    torch.save(model.state_dict(), path)
    return model


def bits(x) -> np.ndarray:
    """The raw bits of a numpy array or torch tensor as a C-ordered integer array."""
    if not isinstance(x, np.ndarray):
        import torch

        t = x.detach().contiguous()
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return t.view(ints[t.element_size()]).numpy().copy()
    ints = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
    return np.array(x, order="C", copy=True).view(ints[x.dtype.itemsize])


def torch_dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def write_zip(path, records: dict[str, bytes]) -> None:
    """A zip archive of uncompressed records, as torch writes them."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(name, data)


def torch_records(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def hostile_archive(path, payload: bytes) -> None:
    """A torch-shaped zip whose data.pkl is `payload`."""
    write_zip(path, {"archive/data.pkl": payload, "archive/byteorder": b"little", "archive/version": b"3\n"})


def pickled(obj, protocol: int) -> bytes:
    import pickle

    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


# XLA's cheaper backend optimisation: the same HLO program and float32 semantics, about half
# the compile time. Used only by sweeps that compile once per sequence length.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jitted_logits(model, fast_compile: bool = False):
    """`tokens (B, T) -> logits (B, T, V)` as numpy, compiled once per shape (eager JAX would
    compile every primitive separately, which is far slower)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    compiled = {}

    def logits(tokens):
        tokens = np.asarray(tokens, dtype=np.int32)
        if not fast_compile:
            return np.asarray(forward(state, tokens))
        if tokens.shape not in compiled:
            compiled[tokens.shape] = forward.lower(state, tokens).compile(compiler_options=FAST_COMPILE)
        return np.asarray(compiled[tokens.shape](state, tokens))

    return logits


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Torch on one thread while a module's tests run: the reference's many tiny per-head ops
    are 10x+ slower with torch's thread pool on a busy 2-core machine (threads wait on each
    other). Import this fixture into a test module to apply it there."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
