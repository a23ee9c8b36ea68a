"""Hostile and broken files: the precise CheckpointError, and nothing from the file ever runs."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest

import porting
from porting import CheckpointError
from tests.porting_helpers import SMALL, hostile_archive, one_torch_thread, pickled, save_reference, torch_records, write_zip  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        porting.load_weights(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message  # names the file first
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- code-running pickles
class _Touch:
    """Unpickling this with the standard pickle module would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


class _Call:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import subprocess

        return subprocess.call, (["touch", str(self.marker)],)


def _payloads(marker):
    yield "os.system protocol 0", pickled({"w": _Touch(marker)}, 0)
    yield "os.system protocol 2", pickled({"w": _Touch(marker)}, 2)
    yield "builtins.eval protocol 4 (STACK_GLOBAL)", pickled(_Eval(marker), 4)
    yield "builtins.eval protocol 5", pickled([_Eval(marker)], 5)
    yield "INST opcode", f"(S'touch {marker}'\nios\nsystem\n.".encode()
    yield "subprocess.call protocol 3", pickled(_Call(marker), 3)
    # An allowed global (the storage rebuild) wrapped around a disallowed one.
    yield "nested in a tensor rebuild", (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(cposix\nsystem\n(X"
                                         + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode()
                                         + b"tRK\x00)))tR.")


PROTOCOL_2_GLOBALS = ("os.system protocol 2", "subprocess.call protocol 3", "nested in a tensor rebuild")


def test_code_running_pickles_are_refused_with_nothing_run(tmp_path):
    marker = tmp_path / "pwned"
    for name, payload in _payloads(marker):
        # The payload really runs code under the standard unpickler...
        assert not marker.exists()
        try:
            pickle.loads(payload)
        except Exception:
            pass
        assert marker.exists(), f"payload {name!r} is not hostile"
        marker.unlink()
        # ...and not under ours.
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        hostile_archive(path, payload)
        message = load_error(path)
        assert "nothing from the file was run" in message, name
        if name in PROTOCOL_2_GLOBALS:  # refused at the global itself
            assert re.search(r"refused to load global (posix|os|builtins|subprocess)\.\w+", message), message
        else:  # refused at the first opcode torch.save never writes (protocol 0 / 4 / 5)
            assert re.search(r"unsupported pickle opcode [A-Z_]+ at byte \d+", message), message
        assert not marker.exists(), name


def test_bare_pickle_and_legacy_headers_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "bare.pt").write_bytes(pickled(_Touch(marker), 2))
    assert "a bare pickle" in load_error(tmp_path / "bare.pt")
    legacy = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + pickled(_Touch(marker), 2)
    (tmp_path / "legacy.pt").write_bytes(legacy)
    assert "legacy torch format" in load_error(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path):
    from porting.torch_reference import make_reference

    torch.save(make_reference("drake", **SMALL), tmp_path / "module.pt")
    message = load_error(tmp_path / "module.pt")
    assert "refused to load global porting.torch_reference.DrakeGPT" in message
    assert "save model.state_dict() instead" in message


def test_out_of_bounds_view_is_refused(tmp_path):
    """A tensor view reaching past its storage would read foreign memory: refused."""
    torch.save({"w": torch.randn(4)}, tmp_path / "ok.pt")
    records = torch_records(tmp_path / "ok.pt")
    # size (4,) -> (9,): the pickle's BININT1 4 after the persistent id becomes 9.
    pkl = records["ok/data.pkl"]
    assert pkl.count(b"K\x04\x85") == 1
    records["ok/data.pkl"] = pkl.replace(b"K\x04\x85", b"K\x09\x85")
    write_zip(tmp_path / "oob.pt", records)
    message = load_error(tmp_path / "oob.pt")
    assert "reaches element 8 of a storage of 4 elements" in message


def test_object_state_cannot_be_injected(tmp_path):
    """BUILD on the allowed objects accepts only torch's `_metadata` on a state dict."""
    payload = b"\x80\x02ccollections\nOrderedDict\n)R}X\x09\x00\x00\x00__class__K\x01sb."
    hostile_archive(tmp_path / "build.pt", payload)
    assert "unexpected state for an OrderedDict" in load_error(tmp_path / "build.pt")
    # (None, {"__defaults__": (1,)}) as slot state on the rebuild function itself.
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."
    hostile_archive(tmp_path / "defaults.pt", payload)
    assert "BUILD at byte 59 of data.pkl on something other than an OrderedDict" in load_error(tmp_path / "defaults.pt")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    np.testing.assert_array_equal(porting.read_state_dict(good)["w"], [1.0, 1.0])


# ----------------------------------------------------------------------------- broken files
@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pt"
    model = save_reference(path, "drake", seed=11)
    return path, model.state_dict()


def test_truncated_files(tmp_path, good):
    path, _ = good
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        assert "corrupt or truncated zip" in load_error(tmp_path / "cut.pt")
    porting.convert(path, tmp_path / "f.safetensors")
    blob = (tmp_path / "f.safetensors").read_bytes()
    for cut in (len(blob) - 1, 40, 9):
        (tmp_path / "cut.safetensors").write_bytes(blob[:cut])
        assert "truncated safetensors file" in load_error(tmp_path / "cut.safetensors")


def test_corrupted_record_fails_its_checksum(tmp_path, good):
    path, _ = good
    data = bytearray(path.read_bytes())
    start = data.find(b"good/data/0") + 200  # inside the first storage's bytes
    data[start : start + 4] = b"\xff\xff\xff\xff"
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    assert "corrupt or truncated zip record good/data/0" in load_error(tmp_path / "flipped.pt")


def test_empty_random_directory_missing(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert load_error(tmp_path / "empty.pt").endswith("empty file (0 bytes), not a checkpoint")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a checkpoint: unrecognised content" in load_error(tmp_path / "random.pt")
    assert load_error(tmp_path).endswith("is a directory, not a checkpoint file (nor a jaxgpt orbax checkpoint directory)")
    assert load_error(tmp_path / "nope.pt").endswith("no such file")
    write_zip(tmp_path / "other.zip", {"readme.txt": b"hello"})
    assert "not a torch checkpoint: the first zip record is not in a folder" in load_error(tmp_path / "other.zip")


def test_short_storage_record(tmp_path, good):
    path, _ = good
    records = torch_records(path)
    records["good/data/3"] = records["good/data/3"][:-4]
    write_zip(tmp_path / "short.pt", records)
    assert re.search(r"storage record data/3 holds \d+ bytes, expected \d+ x 4", load_error(tmp_path / "short.pt"))


def test_missing_and_unexpected_keys_all_listed(tmp_path, good):
    _, state = good
    state = dict(state)
    del state["transformer_blocks.0.mhsa.attention_heads.2.value_layer.weight"]
    del state["layer_norm_three.bias"]
    state["transformer_blocks.0.extra.weight"] = torch.zeros(3)
    state["zzz"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pt")
    message = load_error(tmp_path / "keys.pt")
    assert ("2 missing keys: layer_norm_three.bias, transformer_blocks.0.mhsa.attention_heads.2.value_layer.weight; "
            "2 unexpected keys: transformer_blocks.0.extra.weight, zzz") in message
    assert "drake model (vocab_size=7, context_length=16, model_dim=24, num_blocks=1, num_heads=3)" in message


def test_shape_mismatches_with_expected_and_found(tmp_path, good):
    _, state = good
    state = dict(state)
    state["transformer_blocks.0.vanilla_nn.first_linear_layer.weight"] = torch.zeros(95, 24)
    state["layer_norm_three.weight"] = torch.zeros(24, 1)
    torch.save(state, tmp_path / "shapes.pt")
    message = load_error(tmp_path / "shapes.pt")
    assert ("2 shape mismatches: transformer_blocks.0.vanilla_nn.first_linear_layer.weight expected [96, 24] "
            "found [95, 24], layer_norm_three.weight expected [24] found [24, 1]") in message


def test_non_finite_values(tmp_path, good):
    _, state = good
    state = dict(state)
    w = state["vocab_projection.weight"].clone()
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), -float("inf")
    state["vocab_projection.weight"] = w
    b = state["token_embedding.weight"].clone().half()
    b[3, 3] = float("nan")
    state["token_embedding.weight"] = b
    torch.save(state, tmp_path / "nan.pt")
    message = load_error(tmp_path / "nan.pt")
    assert ("2 tensors with non-finite values: token_embedding.weight (1 NaN, 0 inf), "
            "vocab_projection.weight (1 NaN, 2 inf)") in message


def test_integer_tensor(tmp_path, good):
    _, state = good
    state = dict(state, **{"layer_norm_three.bias": torch.zeros(24, dtype=torch.int64)})
    torch.save(state, tmp_path / "int.pt")
    assert "1 non-floating tensor: layer_norm_three.bias is int64" in load_error(tmp_path / "int.pt")


def test_unrecognised_variant(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "vocab_projection.bias": torch.zeros(3)}, tmp_path / "other.pt")
    message = load_error(tmp_path / "other.pt")
    assert "cannot recognise the model variant" in message and "encoder.weight, vocab_projection.bias" in message
    torch.save({}, tmp_path / "nothing.pt")
    assert "keys: no keys at all" in load_error(tmp_path / "nothing.pt")


def test_not_a_dict_of_tensors(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert load_error(tmp_path / "tensor.pt").endswith("not a state dict: the file holds a single tensor, not a dict of tensors")
    torch.save({"a": 3}, tmp_path / "int.pt")
    assert load_error(tmp_path / "int.pt").endswith("not a state dict: a holds a value of type int, not a tensor")


def test_inconsistent_dimensions(tmp_path, good):
    _, state = good
    # 3 heads of size 8 claimed by the keys, but model_dim 25 from the embeddings: no valid model.
    state = {k: (torch.zeros(v.shape[0], 25) if k.endswith("embedding.weight") else v) for k, v in state.items()}
    torch.save(state, tmp_path / "dims.pt")
    assert "the shapes describe no valid model: GPTConfig.model_dim (25) must be divisible by num_heads (3)" in load_error(
        tmp_path / "dims.pt")


def test_flax_metadata_must_agree_with_tensors(tmp_path, good):
    from porting.safetensors_io import read_safetensors, write_safetensors

    path, _ = good
    porting.convert(path, tmp_path / "f.safetensors")
    tensors, metadata = read_safetensors(tmp_path / "f.safetensors")
    write_safetensors(tmp_path / "lie.safetensors", tensors, dict(metadata, variant="learning"))
    assert "the metadata disagrees with the tensors: variant='learning' (the tensors say 'drake')" in load_error(
        tmp_path / "lie.safetensors")


def test_not_an_orbax_directory_and_a_damaged_one(tmp_path, good):
    path, _ = good
    porting.convert(path, tmp_path / "ckpt")
    for root, _, files in os.walk(tmp_path / "ckpt" / "params"):
        for f in files:
            if f != "_METADATA":
                continue
            with open(os.path.join(root, f), "w") as fh:
                fh.write("{broken")
    assert "corrupt orbax checkpoint" in load_error(tmp_path / "ckpt")


def test_absurd_block_index(tmp_path, good):
    _, state = good
    torch.save(dict(state, **{"transformer_blocks.999999.layer_norm_one.bias": torch.zeros(24)}), tmp_path / "idx.pt")
    assert "block/head indices (up to 999999) exceed the" in load_error(tmp_path / "idx.pt")
