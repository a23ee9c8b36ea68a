"""The one atomic-write helper (jaxgpt.atomic): permissions, failures, errors, and its users."""

import json
import os
import stat

import numpy as np
import pytest

import jaxgpt
import porting
from jaxgpt.atomic import OutputError, atomic_directory, atomic_file, write_json
from jaxgpt.plots import plot_history


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield 0o640  # what open(path, "w") creates under this umask
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_new_file_gets_the_umask_permissions_even_if_the_writer_recreates_it(tmp_path, umask_027):
    with atomic_file(tmp_path / "a.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"a")
    with atomic_file(tmp_path / "b.bin") as tmp:
        os.remove(tmp)  # as safetensors does: its own file, created 0600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "b.bin") == umask_027
    assert leftovers(tmp_path) == []


def test_real_writers_outputs_have_the_umask_permissions(tmp_path, umask_027):
    porting.convert(jaxgpt.DEFAULT_WEIGHTS, tmp_path / "w.safetensors")  # safetensors alone makes it 0600
    jaxgpt.default_vocab().save(tmp_path / "vocab.json")
    plot_history([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}], tmp_path / "curve.png")
    write_json(tmp_path / "h.json", [{"step": 1}])
    for name in ("w.safetensors", "vocab.json", "curve.png", "h.json"):
        assert mode(tmp_path / name) == umask_027, name
    assert jaxgpt.Vocab.load(tmp_path / "vocab.json") == jaxgpt.default_vocab()
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(tmp_path) == []


def test_replacing_a_file_keeps_its_permissions(tmp_path, umask_027):
    target = tmp_path / "private.json"
    target.write_text("{}")
    os.chmod(target, 0o600)
    write_json(target, {"é": [1, 2]})
    assert mode(target) == 0o600
    assert target.read_text(encoding="utf-8") == '{\n "é": [\n  1,\n  2\n ]\n}\n'
    assert json.loads(target.read_text(encoding="utf-8")) == {"é": [1, 2]}


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    for name in ("out.json", "new.json"):
        with pytest.raises(KeyboardInterrupt):
            with atomic_file(tmp_path / name) as tmp:
                with open(tmp, "w") as f:
                    f.write("half")
                raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            os.mkdir(tmp)
            raise OSError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_unwritable_destinations_raise_one_precise_error(tmp_path):
    with pytest.raises(OutputError, match=r"x\.json: cannot write: directory .*missing does not exist"):
        write_json(tmp_path / "missing" / "x.json", {})
    with pytest.raises(OutputError, match="cannot write a file: a directory exists at this path"):
        write_json(tmp_path, {})
    with pytest.raises(OutputError, match="the path already exists"):
        with atomic_directory(tmp_path):
            pass
    with pytest.raises(porting.CheckpointError, match="cannot write: directory .* does not exist"):
        porting.save_flax(porting.load_weights(jaxgpt.DEFAULT_WEIGHTS), tmp_path / "no" / "w.safetensors", "safetensors")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_renames_a_complete_directory(tmp_path):
    with atomic_directory(tmp_path / "ckpt") as tmp:
        os.mkdir(tmp)
        np.save(os.path.join(tmp, "a.npy"), np.arange(3))
    assert os.listdir(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(np.load(tmp_path / "ckpt" / "a.npy"), np.arange(3))
