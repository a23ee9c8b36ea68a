"""Hostile files cost what their size says: the defects issue 16 found, and their relatives.

Each case is a small file crafted to make a naive reader raise a foreign exception, expand
data, or build an exponentially large structure. The reader must answer with a one-line
CheckpointError, within a memory peak (tracemalloc counts numpy buffers too) that is a small
multiple of the file, and `jaxgpt inspect` must print one line.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

import porting
from porting import CheckpointError
from tests.porting_helpers import one_torch_thread, torch_records, write_zip  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")


def refused(path, max_peak: int = 4 << 20) -> str:
    """The CheckpointError message for `path`, checking the reader's memory peak on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            porting.read_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 2500, message[:300]
    assert peak < max_peak, f"peak {peak:,} bytes reading a {path.stat().st_size:,}-byte file"
    return message


def inspect_line(path, capsys) -> str:
    from jaxgpt.cli import main

    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err[:500]
    assert captured.err.startswith("jaxgpt: error: ")
    return captured.err


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.pt"
    torch.save({"w": torch.randn(4)}, path)
    return path


# ----------------------------------------------------------------------------- the three defects
def central_entry(data: bytes, name: bytes) -> int:
    """Offset of `name`'s central directory header in a zip's bytes."""
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        if data[at + 46 : at + 46 + struct.unpack_from("<H", data, at + 28)[0]] == name:
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"no central entry {name!r}")


def test_corrupted_version_needed_byte(tmp_path, small, capsys):
    """zipfile raises NotImplementedError for a 'version needed to extract' above 6.3; torch's
    reader (miniz) ignores the field, and so does ours: the file reads as torch reads it."""
    data = bytearray(small.read_bytes())
    at = central_entry(bytes(data), b"small/data.pkl")
    data[at + 6] = 0xFF  # version needed to extract: 25.5
    bad = tmp_path / "version.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(bad)  # the foreign exception the old reader let through
    np.testing.assert_array_equal(porting.read_state_dict(bad)["w"], torch.load(bad, weights_only=True)["w"].numpy())
    assert "cannot recognise the model variant" in inspect_line(bad, capsys)  # {"w": ...} is no model
    for flag, problem in ((0x1, "is encrypted"), (0x20, "patch data"), (0x2000, "encrypted central directory")):
        data = bytearray(small.read_bytes())
        struct.pack_into("<H", data, central_entry(bytes(data), b"small/data.pkl") + 8, flag)
        bad.write_bytes(bytes(data))
        assert problem in refused(bad)
    data = bytearray(small.read_bytes())
    data[central_entry(bytes(data), b"small/data.pkl") + 46] = 0xFF  # a name byte that is not UTF-8
    bad.write_bytes(bytes(data))
    assert "not UTF-8" in refused(bad)


def test_zip_checks_of_torchs_reader(tmp_path, small):
    """What miniz refuses, the reader refuses (the fuzz campaign found each of these accepted)."""
    data = small.read_bytes()
    eocd = data.rfind(b"PK\x05\x06")
    for field, value, problem in ((4, 1, "multi-disk"), (8, 1, "multi-disk"), (12, 3, "does not fit")):
        bad = bytearray(data)
        if data[eocd - 20 : eocd - 16] == b"PK\x06\x07":  # torch writes zip64 records: patch both
            zip64 = struct.unpack_from("<Q", data, eocd - 12)[0]
            offset = {4: 16, 8: 24, 12: 40}[field]
            struct.pack_into("<Q" if field != 4 else "<I", bad, zip64 + offset, value)
        struct.pack_into("<H" if field != 12 else "<I", bad, eocd + field, value)
        (tmp_path / "z.pt").write_bytes(bytes(bad))
        assert problem in refused(tmp_path / "z.pt")
    records = torch_records(small)
    del records["small/version"]
    write_zip(tmp_path / "noversion.pt", records)
    assert "no version record" in refused(tmp_path / "noversion.pt")
    records = torch_records(small)
    records["small/version"] = b"11\n"
    write_zip(tmp_path / "v11.pt", records)
    assert "unsupported torch file format version" in refused(tmp_path / "v11.pt")
    records = torch_records(small)
    records = {"other/readme": b"", **records}  # torch takes the first record's folder
    write_zip(tmp_path / "first.pt", records)
    assert "record small/data.pkl is outside the archive's folder other/" in refused(tmp_path / "first.pt")
    data = bytearray(small.read_bytes())
    struct.pack_into("<I", data, central_entry(bytes(data), b"small/version") + 38, 0x10)  # MS-DOS directory
    (tmp_path / "dir.pt").write_bytes(bytes(data))
    assert "small/version is marked as a directory" in refused(tmp_path / "dir.pt")


def deflated_archive(path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in records.items():
            zf.writestr(name, data)


def test_deflated_storage_is_refused_before_expanding(tmp_path, capsys):
    """A 64 MB storage of zeros deflates to 64 KB; it must not be expanded to be refused."""
    torch.save({"w": torch.zeros(16 << 20)}, tmp_path / "zeros.pt")
    records = torch_records(tmp_path / "zeros.pt")
    deflated_archive(tmp_path / "bomb.pt", records)
    assert (tmp_path / "bomb.pt").stat().st_size < 200_000
    message = refused(tmp_path / "bomb.pt", max_peak=2 << 20)
    assert "is compressed: torch writes records uncompressed" in message
    inspect_line(tmp_path / "bomb.pt", capsys)
    # Only data.pkl deflated (the storages stored) is refused the same way.
    with zipfile.ZipFile(tmp_path / "pkl.pt", "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.endswith(".pkl") else zipfile.ZIP_STORED)
    assert "zeros/data.pkl is compressed" in refused(tmp_path / "pkl.pt")


def shared_tuples(depth: int, width: int = 2) -> bytes:
    """Pickle bytes pushing t_depth, where t_0 = (1,) and t_i = (t_{i-1},) * width via the memo:
    a few bytes per level, a structure of width**depth leaves."""
    # One MARK per level up front: each level's tuple is then the first item of the next.
    out = b"(" * depth + b"K\x01\x85q\xc8"  # (1,), BINPUT 200 (the file's own memo stops near 20)
    for _ in range(depth):
        out += b"h\xc8" * (width - 1) + b"tq\xc8"
    return out


def with_size_field(path, out, size_bytes: bytes) -> None:
    records = torch_records(path)
    name = next(n for n in records if n.endswith("data.pkl"))
    assert records[name].count(b"K\x04\x85") == 1  # the size (4,) of the one tensor
    records[name] = records[name].replace(b"K\x04\x85", size_bytes)
    write_zip(out, records)


def test_nested_shared_tuples_in_a_size_field(tmp_path, small, capsys):
    """2**60 leaves in 1.2 KB: the message describes the value, never builds its repr."""
    with_size_field(small, tmp_path / "deep.pt", shared_tuples(60))
    assert (tmp_path / "deep.pt").stat().st_size < 2000
    assert "nests tuples more than 8 deep" in refused(tmp_path / "deep.pt")
    inspect_line(tmp_path / "deep.pt", capsys)
    # Within the nesting limit but as wide as the stack allows: 5000**6 leaves, still cheap.
    with_size_field(small, tmp_path / "wide.pt", shared_tuples(6, width=5000))
    message = refused(tmp_path / "wide.pt")
    assert "tensor size must be a tuple of at most 32 ints, got a tuple of 5000 items" in message
    with_size_field(small, tmp_path / "wide.pt", shared_tuples(6, width=30))
    assert "tensor size must hold ints in [0, 2**40), got a tuple of 30 items" in refused(tmp_path / "wide.pt")


# ----------------------------------------------------------------------------- relatives
def test_pickle_limits_and_opcodes(tmp_path, small):
    records = torch_records(small)
    name = next(n for n in records if n.endswith("data.pkl"))

    def with_pickle(payload: bytes, max_peak: int = 4 << 20):
        write_zip(tmp_path / "p.pt", {**records, name: payload})
        return refused(tmp_path / "p.pt", max_peak)

    memo = b"".join(b"r" + struct.pack("<I", i) for i in range(70_000))
    assert "memoizes more than 65536 objects" in with_pickle(b"\x80\x02N" + memo + b".", max_peak=8 << 20)
    assert "opens more than 64 nested MARKs" in with_pickle(b"\x80\x02" + b"(" * 100 + b".")
    assert "stacks more than 65536 objects" in with_pickle(b"\x80\x02" + b"N" * 70_000 + b".")
    assert "unsupported pickle opcode FRAME" in with_pickle(b"\x80\x04\x95" + bytes(8) + b"}.")
    assert "unsupported pickle opcode EMPTY_LIST" in with_pickle(b"\x80\x02].")
    assert "ends in the middle of an opcode argument" in with_pickle(b"\x80\x02X\xff\xff\xff\x7fabc")
    assert "ends before its STOP opcode" in with_pickle(b"\x80\x02}")
    assert "memo entry 7, which was never stored" in with_pickle(b"\x80\x02h\x07.")
    assert "REDUCE calls torch.FloatStorage, which is not a function" in with_pickle(b"\x80\x02ctorch\nFloatStorage\n)R.")
    assert "storage type must be one of" in with_pickle(b"\x80\x02(X\x07\x00\x00\x00storage}X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ.")
    assert "uses a tuple of 0 items as a dict key" in with_pickle(b"\x80\x02})K\x01s.")
    huge = "k" * 100_000
    message = with_pickle(b"\x80\x02}X" + struct.pack("<I", len(huge)) + huge.encode() + b"K\x01s.")
    assert "... (100,000 characters)" in message


def test_hostile_sizes_strides_offsets_and_views(tmp_path, small):
    for size, expected in ((b"\x8a\x08" + (1 << 62).to_bytes(8, "little") + b"\x85", "ints in [0, 2**40)"),
                           (b"J\xff\xff\xff\xff\x85", "got -1"),
                           (b"(" + b"K\x01" * 40 + b"t", "at most 32 ints"),
                           (b"(K\x00" + (b"\x8a\x06" + (2**39).to_bytes(6, "little")) * 3 + b"t", "2**40 elements or more")):
        with_size_field(small, tmp_path / "s.pt", size)
        assert expected in refused(tmp_path / "s.pt")
    # A stride-0 view describing 2**30 elements of a 4-element storage: a view costs nothing,
    # but converting it would allocate 4 GB. Refused by the elements-per-stored-element bound.
    records = torch_records(small)
    name = next(n for n in records if n.endswith("data.pkl"))
    pkl = records[name].replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85", 1).replace(b"K\x01\x85", b"K\x00\x85", 1)
    write_zip(tmp_path / "expand.pt", {**records, name: pkl})
    assert "views that repeat stored elements more than 4 times" in refused(tmp_path / "expand.pt")


def test_zip_structure_relatives(tmp_path, small):
    records = torch_records(small)
    write_zip(tmp_path / "dup.pt", records)
    with zipfile.ZipFile(tmp_path / "dup.pt", "a") as zf, pytest.warns(UserWarning):
        zf.writestr("small/data/0", records["small/data/0"])
    assert "two records named small/data/0" in refused(tmp_path / "dup.pt")
    data = bytearray(small.read_bytes())
    at = central_entry(bytes(data), b"small/data/0")
    struct.pack_into("<I", data, at + 42, len(data) - 10)  # local header offset near the end
    (tmp_path / "offset.pt").write_bytes(bytes(data))
    assert "record small/data/0 lies outside the file" in refused(tmp_path / "offset.pt")
    struct.pack_into("<I", data, at + 42, 0)  # the local header of data.pkl, another name
    (tmp_path / "other.pt").write_bytes(bytes(data))
    assert "local header does not match the directory" in refused(tmp_path / "other.pt")


def test_safetensors_relatives(tmp_path, small):
    def header_file(header, data=b"", raw=None):
        blob = raw if raw is not None else json.dumps(header).encode()
        (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return refused(tmp_path / "h.safetensors")

    assert "malformed safetensors header" in header_file(None, raw=b"{" + b'"a":' * 1 + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "unsupported dtype a list of 1 items" in header_file({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    assert "shape must be a list of at most 32 ints" in header_file({"w": {"dtype": "F32", "shape": [[1] * 5000], "data_offsets": [0, 4]}}, bytes(4))
    for shape in ([0, 2**63], [2**64, 0], [0, -1]):  # empty, but no numpy array has such a shape
        assert "in [0, 2**40)" in header_file({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    assert "2**40 elements or more" in header_file({"w": {"dtype": "F32", "shape": [0, 2**39, 2**39], "data_offsets": [0, 0]}})
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    assert "overlap or leave a gap" in header_file(overlap, bytes(12))
    assert "overlap or leave a gap" in header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8))
    entry = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    assert "__metadata__ must map strings to strings" in header_file({"__metadata__": 0, **entry}, bytes(4))
