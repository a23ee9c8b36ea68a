"""The torch-free readers return exactly what torch/safetensors return, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import porting
from porting.torch_zip import read_torch_zip
from tests.porting_helpers import bits, one_torch_thread, save_reference, torch_dtype_name, torch_records, write_zip  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_as_torch(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, t in theirs.items():
        a = ours[key]
        assert str(a.dtype) == torch_dtype_name(t), key
        assert a.shape == tuple(t.shape), key
        np.testing.assert_array_equal(bits(a), bits(t), err_msg=key)


def check_file(path, map_location=None) -> None:
    theirs = torch.load(path, weights_only=True, map_location=map_location)
    assert_same_as_torch(read_torch_zip(path), theirs)
    assert_same_as_torch(porting.read_state_dict(path), theirs)


def views(base: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors that share `base`'s storage in every way a state dict could."""
    return {
        "whole": base,
        "transposed": base.t(),
        "sliced": base[1:3, 2:],  # storage offset and non-contiguous rows
        "strided": base[::2, ::3],
        "column": base[:, 1],
        "narrow_tail": base.reshape(-1)[5:],  # offset into the flat storage
        "expanded": base[0].expand(4, base.shape[1]),  # stride 0
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64, torch.int64, torch.bool], ids=str)
def test_views_and_shared_storage_bit_exact(tmp_path, dtype):
    base = (torch.randn(5, 7, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    state = views(base)
    state["scalar"] = torch.tensor(3.5).to(dtype)
    state["empty"] = torch.zeros(0, 3, dtype=dtype)
    state["cube"] = torch.arange(60).reshape(3, 4, 5).permute(2, 0, 1).to(dtype)
    torch.save(state, tmp_path / "views.pt")
    check_file(tmp_path / "views.pt")


@pytest.mark.parametrize("seed", range(24))
def test_many_random_files_bit_exact(tmp_path, seed):
    """Random dicts of float tensors of every supported dtype, contiguous or views."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for n in range(int(rng.integers(1, 8))):
        shape = tuple(int(s) for s in rng.integers(1, 9, size=int(rng.integers(1, 4))))
        dtype = FLOAT_DTYPES[int(rng.integers(len(FLOAT_DTYPES)))]
        t = (torch.randn(shape, generator=gen) * 10 ** float(rng.uniform(-3, 3))).to(dtype)
        kind = rng.integers(4)
        if kind == 1 and t.dim() >= 2:
            t = t.transpose(0, -1)
        elif kind == 2 and t.shape[0] > 1:
            t = t[1:]
        elif kind == 3:
            t = t.reshape(-1)[::2]
        state[f"layer{n}.{'weight' if n % 2 else 'bias'}"] = t
    torch.save(state, tmp_path / f"random{seed}.pt")
    check_file(tmp_path / f"random{seed}.pt")


def test_module_state_dict_with_metadata(tmp_path):
    """A real `model.state_dict()`: OrderedDict with `_metadata`, torch key order kept."""
    model = save_reference(tmp_path / "ref.pt", "drake", seed=3)
    check_file(tmp_path / "ref.pt")
    assert list(read_torch_zip(tmp_path / "ref.pt")) == list(model.state_dict())


def test_parameters_and_requires_grad(tmp_path):
    state = {"p": torch.nn.Parameter(torch.randn(3, 4)), "q": torch.randn(2, requires_grad=True)}
    torch.save(state, tmp_path / "params.pt")
    check_file(tmp_path / "params.pt")


def test_tensors_saved_from_cuda_load_on_cpu(tmp_path, monkeypatch):
    """The storages' location tag says cuda:0 (as on a GPU machine); the reader ignores it."""
    import torch.serialization

    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"w": torch.randn(4, 3).half(), "b": torch.randn(3)}, tmp_path / "cuda.pt")
    monkeypatch.undo()
    pickle_bytes = torch_records(tmp_path / "cuda.pt")["cuda/data.pkl"]
    assert b"cuda:0" in pickle_bytes and b"cpu" not in pickle_bytes  # the file really says cuda
    check_file(tmp_path / "cuda.pt", map_location="cpu")


def test_big_endian_archive(tmp_path):
    """byteorder 'big' + byte-swapped records read the same values as the little-endian file."""
    state = {"a": torch.randn(3, 5), "h": torch.randn(4).half(), "bf": torch.randn(6).bfloat16()}
    torch.save(state, tmp_path / "le.pt")
    records = torch_records(tmp_path / "le.pt")
    itemsize = {"0": 4, "1": 2, "2": 2}
    swapped = {}
    for name, data in records.items():
        if name == "le/byteorder":
            data = b"big"
        elif "/data/" in name:
            data = np.frombuffer(data, f"<u{itemsize[name.rsplit('/', 1)[1]]}").byteswap().tobytes()
        swapped[name] = data
    write_zip(tmp_path / "be.pt", swapped)
    assert_same_as_torch(read_torch_zip(tmp_path / "be.pt"), state)
    check_file(tmp_path / "be.pt")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_torch_keyed_safetensors_bit_exact(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    model = save_reference(tmp_path / "unused.pt", "learning", seed=5)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "ref.safetensors")
    ours = porting.read_state_dict(tmp_path / "ref.safetensors")
    theirs = load_file(tmp_path / "ref.safetensors")
    assert_same_as_torch({k: ours[k] for k in theirs}, theirs)


def test_flax_safetensors_readable_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    save_reference(tmp_path / "ref.pt", "drake", seed=6)
    porting.convert(tmp_path / "ref.pt", tmp_path / "flax.safetensors")
    theirs = load_file(tmp_path / "flax.safetensors")
    ours = porting.read_state_dict(tmp_path / "flax.safetensors")
    assert set(ours) == set(theirs) and "blocks.0.attention.qkv" in ours
    for key in theirs:
        np.testing.assert_array_equal(bits(ours[key]), bits(theirs[key]))


def test_reader_output_is_read_only(tmp_path):
    torch.save({"a": torch.randn(4, 4)}, tmp_path / "a.pt")
    with pytest.raises(ValueError):
        read_torch_zip(tmp_path / "a.pt")["a"][0, 0] = 1.0


def test_legacy_format_gets_a_resave_hint(tmp_path):
    torch.save({"a": torch.randn(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(porting.CheckpointError, match=r"legacy torch format .*torch\.save\(torch\.load\(") as e:
        porting.load_weights(tmp_path / "legacy.pt")
    assert str(tmp_path / "legacy.pt") in str(e.value)


_TORCH_FREE = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    import porting
    for path in sys.argv[1:]:
        model = porting.load_weights(path)
        logits = np.asarray(model(np.arange(5)[None] % model.config.vocab_size))
        print(path, model.config.variant, logits.shape, float(np.abs(logits).sum()))
    try:
        porting.save_weights(model, sys.argv[1] + ".out.pt")
    except porting.TorchUnavailableError as e:
        print("save:", e)
    assert sys.modules["torch"] is None
    """
)


def test_load_weights_works_without_torch(tmp_path):
    """load_weights never imports torch: it runs where `import torch` fails."""
    save_reference(tmp_path / "d.pt", "drake", seed=7)
    save_reference(tmp_path / "l.pt", "learning", seed=8)
    porting.convert(tmp_path / "d.pt", tmp_path / "d.safetensors")
    paths = [str(tmp_path / n) for n in ("d.pt", "l.pt", "d.safetensors")]
    run = subprocess.run([sys.executable, "-c", _TORCH_FREE, *paths], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for path, variant, line in zip(paths, ["drake", "learning", "drake"], lines):
        assert line.startswith(f"{path} {variant} (1, 5, 7) ")
    # The same logits with or without torch around.
    assert float(lines[0].split()[-1]) == float(lines[2].split()[-1])
    expected = porting.load_weights(paths[0])(np.arange(5)[None])
    assert float(np.abs(np.asarray(expected)).sum()) == float(lines[0].split()[-1])
    assert lines[-1] == 'save: writing a torch .pt file needs torch, which is not installed: pip install "jaxgpt[torch]"'
    assert not os.path.exists(paths[0] + ".out.pt")
