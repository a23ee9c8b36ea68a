"""`jaxgpt generate --beams N`: the best beam on stdout, every beam with --json, one-line errors."""

from __future__ import annotations

import json

import pytest

import jaxgpt
from porting import load_weights
from tests.cli_helpers import run_cli, small_checkpoint


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return small_checkpoint(tmp_path_factory, "cli_beam", seed=5)


@pytest.fixture(autouse=True)
def no_user_cache(monkeypatch):
    monkeypatch.setenv("JAXGPT_NO_COMPILE_CACHE", "1")


def run(capsys, *args):
    return run_cli(capsys, "generate", "-q", *args)


def test_prints_the_best_beam_and_json_has_them_all(capsys, weights):
    expected = jaxgpt.beam_search_text(load_weights(weights), "ROMEO:", 30, beams=3)
    code, out, err = run(capsys, "--weights", weights, "--prompt", "ROMEO:", "--num-chars", "30", "--beams", "3")
    assert code == 0 and err == "" and out == expected[0][0]
    code, out, _ = run(capsys, "--weights", weights, "--prompt", "ROMEO:", "--num-chars", "30", "--beams", "3", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["prompt"] == "ROMEO:" and len(doc["beams"]) == 3
    assert [(b["text"], pytest.approx(b["score"], abs=1e-5)) for b in doc["beams"]] == [(t, s) for t, s in expected]


def test_stop_string_ends_the_beam(capsys, weights):
    best = jaxgpt.beam_search_text(load_weights(weights), "", 30, beams=2)[0][0]
    stop = best[10]
    code, out, _ = run(capsys, "--weights", weights, "--num-chars", "30", "--beams", "2", "--stop", stop, "--json")
    assert code == 0
    beams = json.loads(out)["beams"]
    assert all(stop not in b["text"] for b in beams) and any(b["stopped"] for b in beams)


@pytest.mark.parametrize("args,message", [
    (["--beams", "105"], "--beams must be in 1..104"),
    (["--beams", "2", "--temperature", "0.5"], "--temperature only apply to sampling"),
    (["--beams", "2", "--top-k", "3", "--batch", "2"], "--top-k, --batch only apply to sampling"),
    (["--beams", "2", "--mode", "strided"], "--mode strided only apply to sampling"),
])
def test_bad_combinations_are_one_line(capsys, weights, args, message):
    code, out, err = run(capsys, "--weights", weights, "--num-chars", "5", *args)
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err
