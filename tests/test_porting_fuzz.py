"""A few hundred cases of the fuzz campaign (`python -m tests.fuzz_checkpoints N` runs more)."""

from __future__ import annotations

import pytest

from tests import fuzz_checkpoints

pytest.importorskip("torch")


def test_fuzz_campaign_has_no_failures():
    summary = fuzz_checkpoints.campaign(300, seed=12345, workers=1)
    assert sum(summary["counts"].values()) == 300
    assert summary["failures"] == 0, summary["failed_cases"]
    assert set(summary["by_format"]) == {"torch", "safetensors", "orbax"}
    # Both outcomes occur: the mutants are not all broken, nor all harmless.
    assert summary["counts"]["refused"] > 100 and summary["counts"]["accepted"] > 20
    assert summary["case_seconds"]["max"] < fuzz_checkpoints.TIME_LIMIT


def test_one_case_outcomes(tmp_path):
    """The outcome of a foreign exception is reported as a failure, not swallowed."""
    bases = fuzz_checkpoints.make_bases(str(tmp_path))
    assert fuzz_checkpoints.run_case("torch", bases["torch"][0]) == "accepted"
    assert fuzz_checkpoints.run_case("safetensors", bases["safetensors"][0]) == "accepted"
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    assert fuzz_checkpoints.run_case("torch", str(tmp_path / "bad.pt")) == "refused"
    summary = fuzz_checkpoints.summarize([{"case": 0, "format": "torch", "strategy": "flip", "outcome": "FAIL:TypeError",
                                           "seconds": 0.1, "base": "x"}], 1, 0, 1, 1.0)
    assert summary["failures"] == 1 and summary["failed_cases"][0]["outcome"] == "FAIL:TypeError"
