"""`jaxgpt parity`: the per-layer report on small random checkpoints, float32 and float64."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxgpt.cli import main
from porting import parity
from tests.porting_helpers import SMALL, one_torch_thread, save_reference  # one_torch_thread: autouse fixture

torch = pytest.importorskip("torch")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    paths = {}
    for variant in ("drake", "learning"):
        paths[variant] = root / f"{variant}.pt"
        save_reference(paths[variant], variant, seed=21, **{**SMALL, "num_blocks": 2})
    return paths


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_float32_report_every_layer_within_tolerance(capsys, checkpoints, variant):
    code, out, err = run(capsys, "parity", checkpoints[variant], "--batch", "3", "--tokens", "40", "--json")
    assert code == 0 and err == "", err
    r = json.loads(out)
    assert [row["layer"] for row in r["layers"]] == ["embeddings", "block 0", "block 1", "final_norm", "logits"]
    assert r["passed"] and r["dtype"] == "float32" and r["windows"] == [3, SMALL["context_length"]]
    for row in r["layers"]:
        assert 0 <= row["mean_abs_diff"] <= row["max_abs_diff"] <= 5e-5, row
        # each float32 side is compared with the float64 run too
        assert row["jax_vs_float64"]["max"] <= 5e-5 and row["torch_vs_float64"]["max"] <= 5e-5
    assert r["layers"][0]["max_abs_diff"] == 0.0  # the embedding sum is one exact addition
    assert r["layers"][-1]["max_abs_diff"] > 0.0  # float32 products do round differently
    for name in ("greedy", "sampled"):
        assert r["generation"][name]["tokens"] == 40 and r["generation"][name]["agreement"] >= 0.9


def test_float64_every_layer_within_1e_12(capsys, checkpoints):
    code, out, err = run(capsys, "parity", checkpoints["drake"], "--float64", "--batch", "2", "--tokens", "30")
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].endswith("drake model, float64, 2 windows of 16 tokens (seeded random tokens)")
    assert lines[-1].startswith("PASS: worst layer") and "within the tolerance 1e-12" in lines[-1]
    assert "greedy agreement: 30/30 tokens (first divergence none)" in out
    assert "sampled agreement: 30/30 tokens (first divergence none)" in out
    report = parity.report(checkpoints["drake"], parity.random_windows(SMALL["vocab_size"], 2, 16), float64=True, num_new=0)
    assert all(row["max_abs_diff"] <= 1e-12 for row in report["layers"]) and report["generation"] is None
    # ... and the float64 run really is float64: float32 could not get this close
    assert max(row["max_abs_diff"] for row in report["layers"]) < 1e-13


def test_above_tolerance_exits_1(capsys, checkpoints):
    code, out, err = run(capsys, "parity", checkpoints["learning"], "--tolerance", "0", "--tokens", "0", "--batch", "1")
    assert code == 1 and err == ""
    assert out.splitlines()[-1].startswith("FAIL: worst layer") and "above the tolerance" in out
    assert "agreement" not in out  # --tokens 0 skips generation


def test_text_windows_and_bad_text(tmp_path, capsys, checkpoints):
    windows = parity.text_windows(np.arange(100, dtype=np.int32), 3, 16)
    np.testing.assert_array_equal(windows[:, 0], [0, 42, 84])
    assert windows.shape == (3, 16) and (np.diff(windows, axis=1) == 1).all()
    (tmp_path / "short.txt").write_text("abc")
    code, out, err = run(capsys, "parity", checkpoints["drake"], "--text", tmp_path / "short.txt")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "vocabulary has 104 characters but the model's vocab_size is 7" in err


def test_differences_exact_values():
    a = [np.array([[1.0, 2.0]]), np.array([[0.0, -3.0]])]
    b = [np.array([[1.0, 2.5]]), np.array([[0.0, -3.0]])]
    rows = parity.differences(a, b, ["x", "y"])
    assert rows[0] == {"layer": "x", "max_abs_diff": 0.5, "mean_abs_diff": 0.25, "max_abs_value": 2.5}
    assert rows[1]["max_abs_diff"] == 0.0 and rows[1]["max_abs_value"] == 3.0
