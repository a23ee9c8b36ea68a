"""`jaxgpt inspect` and `jaxgpt convert`: content of the output, exact conversions, and one
stderr line with a non-zero exit (never a traceback) for every bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import porting
import porting.safetensors_io
from jaxgpt.cli import main
from tests.porting_helpers import SMALL, hostile_archive, one_torch_thread, pickled, save_reference  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert code != 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxgpt: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    model = save_reference(path, "learning", seed=51, **SMALL)
    return path, model


def test_inspect_prints_variant_config_params_dtypes_size(tmp_path, capsys, checkpoint):
    path, model = checkpoint
    n = len(model.state_dict())
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0 and err == ""
    from jaxgpt import GPTConfig

    params = GPTConfig(**SMALL, variant="learning").num_params()
    assert "variant     learning" in out
    assert "config      vocab_size=7 context_length=16 model_dim=24 num_blocks=1 num_heads=3 (head_size 8, hidden 96)" in out
    assert f"parameters  {params:,} in {n} tensors" in out
    assert f"dtypes      float32 x{n}" in out
    assert f"file size   {os.path.getsize(path):,} bytes" in out
    assert "format      torch zip" in out


def test_inspect_json_agrees_across_formats(tmp_path, capsys, checkpoint):
    path, model = checkpoint
    outputs = {"pt": path, "flax": tmp_path / "f.safetensors", "orbax": tmp_path / "ckpt", "tsafe": tmp_path / "t.safetensors"}
    assert run_cli(capsys, "convert", path, outputs["flax"])[0] == 0
    assert run_cli(capsys, "convert", path, outputs["orbax"])[0] == 0
    assert run_cli(capsys, "convert", path, outputs["tsafe"], "--to", "torch-safetensors")[0] == 0
    infos = {}
    for name, p in outputs.items():
        code, out, _ = run_cli(capsys, "inspect", "--json", p)
        assert code == 0
        infos[name] = json.loads(out)
    for info in infos.values():
        assert info["variant"] == "learning" and info["config"]["model_dim"] == 24
        assert info["num_params"] == infos["pt"]["num_params"]
    assert infos["flax"]["key_names"] == infos["orbax"]["key_names"] == "flax"
    assert infos["tsafe"]["key_names"] == "torch" and infos["tsafe"]["num_tensors"] == len(model.state_dict())
    assert infos["orbax"]["format"] == "orbax" and infos["orbax"]["file_size"] > 0


@pytest.mark.parametrize("via", ["flax.safetensors", "orbax_dir", "torch.safetensors"])
def test_convert_round_trip_is_exact(tmp_path, capsys, checkpoint, via):
    path, model = checkpoint
    middle = tmp_path / via
    extra = ["--to", "torch-safetensors"] if via == "torch.safetensors" else []
    code, out, err = run_cli(capsys, "convert", path, middle, *extra)
    assert code == 0 and err == "" and out.startswith(f"wrote {middle}: learning model")
    assert run_cli(capsys, "convert", middle, tmp_path / "back.pt")[0] == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


def test_convert_refuses_to_overwrite_without_force(tmp_path, capsys, checkpoint):
    path, _ = checkpoint
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    assert_one_error_line(*run_cli(capsys, "convert", path, tmp_path / "out.safetensors"), "already exists", "--force")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    assert run_cli(capsys, "convert", path, tmp_path / "out.safetensors", "--force")[0] == 0
    assert (tmp_path / "out.safetensors").read_bytes() != b"keep me"


def _bad_inputs(tmp_path, good):
    marker = tmp_path / "pwned"

    class Touch:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:3000])
    hostile_archive(tmp_path / "hostile.pt", pickled({"w": Touch()}, 2))
    state = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "final_ln.bias"}, tmp_path / "missing.pt")
    torch.save(dict(state, extra=torch.zeros(1)), tmp_path / "extra.pt")
    torch.save(dict(state, **{"final_ln.bias": torch.zeros(5)}), tmp_path / "shape.pt")
    os.mkdir(tmp_path / "adir")
    return marker, {
        "empty.pt": "empty file",
        "random.pt": "not a checkpoint",
        "truncated.pt": "corrupt or truncated zip",
        "hostile.pt": "refused to load global posix.system",
        "missing.pt": "1 missing key: final_ln.bias",
        "extra.pt": "1 unexpected key: extra",
        "shape.pt": "final_ln.bias expected [24] found [5]",
        "adir": "is a directory",
        "nonexistent.pt": "no such file",
    }


def test_bad_inputs_one_line_nonzero_exit(tmp_path, capsys, checkpoint):
    path, _ = checkpoint
    marker, cases = _bad_inputs(tmp_path, path)
    for name, fragment in cases.items():
        bad = tmp_path / name
        assert_one_error_line(*run_cli(capsys, "inspect", bad), f"{bad}: ", fragment)
        out = tmp_path / f"{name}.converted.safetensors"
        assert_one_error_line(*run_cli(capsys, "convert", bad, out), fragment)
        assert not out.exists()
    assert not marker.exists()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_usage_errors(tmp_path, capsys, checkpoint):
    path, _ = checkpoint
    assert_one_error_line(*run_cli(capsys, "convert", path, tmp_path / "out.txt"), "cannot tell the output format")
    code, out, err = run_cli(capsys, "convert", path)
    assert code == 2 and "Missing argument 'OUT'" in err and len(err.splitlines()) == 1
    assert_one_error_line(*run_cli(capsys, "convert", path, tmp_path / "nodir" / "x.pt"), "does not exist")


def test_real_entry_point_hostile_file(tmp_path, checkpoint):
    """The installed command as a user runs it: one stderr line, exit 1, the payload not run."""
    marker, cases = _bad_inputs(tmp_path, checkpoint[0])
    run = subprocess.run([sys.executable, "-m", "jaxgpt.cli", "inspect", str(tmp_path / "hostile.pt")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("jaxgpt: error: ")
    assert "refused to load global posix.system" in run.stderr
    assert not marker.exists()


@pytest.mark.parametrize("dst,extra", [("out.pt", []), ("out.safetensors", []), ("out_dir", []),
                                       ("t.safetensors", ["--to", "torch-safetensors"])])
def test_convert_verify_one_line(tmp_path, capsys, checkpoint, dst, extra):
    path, model = checkpoint
    code, out, err = run_cli(capsys, "convert", path, tmp_path / dst, "--verify", *extra)
    assert code == 0 and err == "" and out.count("\n") == 1, (out, err)
    assert out.startswith(f"wrote {tmp_path / dst}: learning model")
    params = porting.read_checkpoint(path).params
    stored = len(model.state_dict()) if dst.endswith(".pt") or extra else len(params)  # torch keys or Flax paths
    assert out.endswith(f"; verified: {len(params)} tensors identical bit for bit, {stored} stored keys, same config\n")


def test_verify_finds_a_changed_bit_and_a_changed_config(tmp_path, checkpoint):
    path, _ = checkpoint
    source = porting.convert(path, tmp_path / "a.safetensors")
    tensors, metadata = porting.safetensors_io.read_safetensors(tmp_path / "a.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    key = "blocks.0.mlp.up.kernel"
    tensors[key].view(np.uint32)[0, 0] ^= 1  # the lowest mantissa bit of one value
    porting.safetensors_io.write_safetensors(tmp_path / "b.safetensors", tensors, metadata)
    with pytest.raises(porting.CheckpointError, match=rf"verification failed: 1 tensors differ in their bits: {key}$"):
        porting.verify(source, tmp_path / "b.safetensors")
    other = porting.convert(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    smaller = dataclasses.replace(other, config=dataclasses.replace(other.config, vocab_size=other.config.vocab_size + 1))
    with pytest.raises(porting.CheckpointError, match="config differs: vocab_size"):
        porting.verify(smaller, tmp_path / "c.safetensors")


def test_outputs_take_the_umask_and_pt_exports_are_reproducible(tmp_path, checkpoint):
    path, _ = checkpoint
    before = os.umask(0o027)
    try:
        for name, fmt in (("u.safetensors", None), ("u.pt", None), ("t.safetensors", "torch-safetensors")):
            porting.convert(path, tmp_path / name, fmt)
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name
    finally:
        os.umask(before)
    porting.convert(path, tmp_path / "weights.pt")
    first = (tmp_path / "weights.pt").read_bytes()
    porting.convert(path, tmp_path / "weights.pt")  # replaced: another temporary, same bytes
    assert (tmp_path / "weights.pt").read_bytes() == first
    (tmp_path / "other").mkdir()
    porting.convert(path, tmp_path / "other" / "weights.pt")
    assert (tmp_path / "other" / "weights.pt").read_bytes() == first
    with zipfile.ZipFile(tmp_path / "weights.pt") as zf:
        assert {n.split("/")[0] for n in zf.namelist()} == {"weights"}  # as torch.save names it
