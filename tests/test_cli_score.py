"""`jaxgpt score`: the summary and JSON agree with jaxgpt.score, the HTML page holds every
character with its probability and alternatives, bad input ends in one line and a non-zero exit."""

from __future__ import annotations

import html
import json
import math
import re

import numpy as np
import pytest

import jaxgpt
from porting import load_weights
from tests.cli_helpers import run_cli, small_checkpoint

TEXT = "ROMEO:\nBut soft! what light through yonder window breaks?"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return small_checkpoint(tmp_path_factory, "cli_score", seed=3)


@pytest.fixture(autouse=True)
def no_user_cache(monkeypatch):
    monkeypatch.setenv("JAXGPT_NO_COMPILE_CACHE", "1")


def run(capsys, *args):
    return run_cli(capsys, "score", "-q", *args)


def test_json_matches_the_api(capsys, weights, tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code, out, err = run(capsys, "--text", str(text_file), "--weights", weights, "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    expected = jaxgpt.score(load_weights(weights), TEXT)
    np.testing.assert_allclose(doc["logprobs"], expected, atol=1e-5)
    assert doc["characters"] == len(TEXT)
    assert doc["mean_nats"] == pytest.approx(-float(expected.mean()), rel=1e-5)
    assert doc["bits_per_char"] == pytest.approx(doc["mean_nats"] / math.log(2))
    assert doc["perplexity"] == pytest.approx(math.exp(doc["mean_nats"]))
    worst = [m["index"] for m in doc["most_surprising"]]
    assert len(worst) == 10 and worst[0] == int(np.argmin(expected))
    assert all(expected[a] <= expected[b] for a, b in zip(worst, worst[1:]))


def test_summary_and_page(capsys, weights, tmp_path):
    page = tmp_path / "page.html"
    code, out, _ = run(capsys, "--string", TEXT, "--weights", weights, "--mode", "strided", "--stride", "4",
                       "--html", str(page))
    assert code == 0
    logprobs = jaxgpt.score(load_weights(weights), TEXT, mode="strided", stride=4)
    mean = -float(logprobs.mean())
    assert f"{mean:.4f} nats/char" in out and f"perplexity      {math.exp(mean):.3f}" in out
    assert len(re.findall(r"^ +\d+\. ", out, flags=re.M)) == 10
    document = page.read_text(encoding="utf-8")
    tips = re.findall(r'<span style="background:[^"]+" data-tip="([^"]*)">', document)
    assert len(tips) == len(TEXT)
    for tip, lp in zip(tips, logprobs):
        lines = html.unescape(tip).split("\n")
        assert float(re.search(r"p=([0-9.]+)", lines[0]).group(1)) == pytest.approx(math.exp(lp), abs=6e-5)
        assert len(lines) == 2 + 5  # the character, a heading, five alternatives
        alternatives = [float(line.rsplit(" ", 1)[1]) for line in lines[2:]]
        assert alternatives == sorted(alternatives, reverse=True)
    assert "<script" not in document and "http" not in document  # self-contained


@pytest.mark.parametrize("args,message", [
    (["--string", ""], "empty"),
    (["--string", "tab\there"], "not in the vocabulary: '\\t'"),
    (["--text", "/no/such/file"], "No such file"),
    (["--string", "a", "--stride", "3"], "--stride applies to --mode strided only"),
    (["--string", "a", "--mode", "strided", "--stride", "99"], "--stride must be in 1..16"),
])
def test_bad_input_is_one_line(capsys, weights, args, message):
    code, out, err = run(capsys, *args, "--weights", weights)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("jaxgpt: error: ") and message in err


def test_usage_errors_and_no_partial_page(capsys, weights, tmp_path):
    code, _, err = run(capsys, "--weights", weights)
    assert code == 2 and "exactly one of --text FILE and --string TEXT" in err
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfeabc")
    code, _, err = run(capsys, "--text", str(binary), "--weights", weights)
    assert code == 1 and "not UTF-8" in err
    code, _, err = run(capsys, "--string", "abc", "--weights", weights, "--html", str(tmp_path / "no" / "p.html"))
    assert code == 1 and "does not exist" in err and not (tmp_path / "no").exists()
