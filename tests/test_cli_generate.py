"""`jaxgpt generate`: exact stdout, streaming, batches, one-line errors, compilation cache."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import jaxgpt
from jaxgpt import compile_cache
from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.generate import generate, stream_text
from jaxgpt.model import GPT
from porting import load_weights, save_flax
from tests.cli_helpers import run_cli, small_checkpoint



@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return small_checkpoint(tmp_path_factory, "cli", seed=7)


@pytest.fixture(scope="module")
def model(weights):
    return load_weights(weights)


@pytest.fixture(autouse=True)
def no_user_cache(monkeypatch):
    # In-process runs must not point this test process's JAX at the user's cache directory.
    monkeypatch.setenv("JAXGPT_NO_COMPILE_CACHE", "1")


class Terminal(io.StringIO):
    """A stdout that says it is a terminal and records each write."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def isatty(self):
        return True

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def run(argv, capsys):
    return run_cli(capsys, "generate", *argv)


def test_stdout_is_exactly_the_generated_characters(weights, model, capsys):
    code, out, err = run(["--weights", weights, "--prompt", "To be", "--num-chars", "40", "--seed", "3",
                          "--temperature", "0.8", "--top-k", "30", "--top-p", "0.95"], capsys)
    assert code == 0
    assert out == generate(model, "To be", 40, seed=3, temperature=0.8, top_k=30, top_p=0.95)
    assert len(out) == 40  # neither the prompt nor a newline is added
    assert "jaxgpt:" in err and "40 characters" in err


def test_strided_mode_and_greedy(weights, model, capsys):
    code, out, _ = run(["--weights", weights, "--num-chars", "50", "--mode", "strided", "--stride", "5",
                        "--temperature", "0", "-q"], capsys)
    assert code == 0 and out == generate(model, "", 50, temperature=0.0, mode="strided", stride=5)


def test_terminal_output_streams_the_same_characters(weights, capsys, monkeypatch):
    code, piped, _ = run(["--weights", weights, "--num-chars", "50", "--seed", "1", "-q"], capsys)
    assert code == 0
    terminal = Terminal()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", terminal)
        assert main(["generate", "--weights", weights, "--num-chars", "50", "--seed", "1", "-q"]) == 0
    assert terminal.getvalue() == piped
    assert len([w for w in terminal.writes if w]) >= 4  # 50 characters in chunks of 16
    code, forced, _ = run(["--weights", weights, "--num-chars", "50", "--seed", "1", "-q", "--stream"], capsys)
    assert forced == piped


def test_batch_samples_are_separated(weights, model, capsys):
    code, out, _ = run(["--weights", weights, "--num-chars", "20", "--batch", "3", "--seed", "2", "-q"], capsys)
    assert code == 0
    samples = ["".join(chunks) for chunks in zip(*stream_text(model, "", 20, batch=3, seed=2))]
    assert out == samples[0] + "\n--- sample 2 ---\n" + samples[1] + "\n--- sample 3 ---\n" + samples[2]


def test_vocab_json(weights, model, tmp_path, capsys):
    vocab = jaxgpt.default_vocab()
    path = tmp_path / "v.json"
    vocab.save(path)
    code, out, _ = run(["--weights", weights, "--vocab", str(path), "--num-chars", "10", "-q"], capsys)
    assert code == 0 and out == generate(model, "", 10)



def test_vocab_json_beside_the_weights_is_used(tmp_path, capsys):
    # A `jaxgpt train --vocab-from-text` output directory: weights and vocab.json side by side.
    config = GPTConfig(vocab_size=5, context_length=8, model_dim=12, num_blocks=1, num_heads=2)
    small = GPT(config, rngs=nnx.Rngs(3))
    save_flax(small, tmp_path / "weights.safetensors")
    vocab = jaxgpt.Vocab(tuple("\nabcd"))
    vocab.save(tmp_path / "vocab.json")
    code, out, err = run(["--weights", str(tmp_path / "weights.safetensors"), "--prompt", "abc",
                          "--num-chars", "12", "-q"], capsys)
    assert code == 0, err
    assert out == generate(load_weights(tmp_path / "weights.safetensors"), "abc", 12, vocab=vocab)
    assert set(out) <= set("\nabcd")

def _errors(weights, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    small_vocab = tmp_path / "small_vocab.json"
    jaxgpt.Vocab(tuple("abc")).save(small_vocab)
    return [
        (["--weights", weights, "--prompt", "caf\u00e9\u00bf"], "characters not in the vocabulary: '\u00bf'"),
        (["--weights", weights, "--num-chars", "0"], "--num-chars"),
        (["--weights", weights, "--num-chars", "-5"], "--num-chars"),
        (["--weights", weights, "--top-p", "0"], "--top-p"),
        (["--weights", weights, "--top-p", "1.5"], "--top-p"),
        (["--weights", weights, "--top-k", "0"], "--top-k"),
        (["--weights", weights, "--temperature", "-1"], "--temperature"),
        (["--weights", str(garbage)], "garbage.pt: not a checkpoint"),
        (["--weights", str(tmp_path / "missing.pt")], "missing.pt: no such file"),
        (["--weights", weights, "--vocab", str(small_vocab)], "has 3 characters but"),
        (["--weights", weights, "--vocab", str(tmp_path / "nope.json")], "--vocab"),
        (["--weights", weights, "--stride", "4"], "stride applies to mode='strided' only"),
        (["--weights", weights, "--mode", "strided", "--stride", "17"], "stride must be in 1..context_length=16"),
        (["--weights", weights, "--mode", "fast"], "--mode"),
        (["--weights", weights, "--min-p", "1.5"], "min_p must be"),
        (["--weights", weights, "--repetition-penalty", "-1"], "repetition_penalty must be"),
        (["--weights", weights, "--stop", "\u4e2d"], "stop string '\u4e2d' has characters outside the vocabulary"),
        (["--weights", weights, "--ban", "\u4e2d"], "logit_bias character '\u4e2d'"),
        (["--weights", weights, "--logprobs", "-2", "--json"], "logprobs must be"),
        (["--weights", weights, "--logprobs", "2"], "--logprobs needs --json"),
        (["--weights", weights, "--slots", "0"], "slots must be a positive integer"),
        (["--weights", weights, "--prompt", "a", "--prompt", "\u4e2d"], "characters not in the vocabulary"),
    ]


def test_errors_are_one_line(weights, tmp_path, capsys):
    for argv, message in _errors(weights, tmp_path):
        code, out, err = run(argv, capsys)
        assert code != 0, argv
        assert out == "", argv
        assert err.count("\n") == 1 and err.startswith("jaxgpt: error: "), (argv, err)
        assert message in err, (argv, err)


def test_missing_default_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(jaxgpt, "DEFAULT_WEIGHTS", str(tmp_path / "absent.pt"), raising=False)
    code, out, err = run(["--num-chars", "5"], capsys)
    assert code == 1 and out == "" and "--weights" in err and err.count("\n") == 1


def test_default_weights_are_used(weights, model, monkeypatch, capsys):
    monkeypatch.setattr(jaxgpt, "DEFAULT_WEIGHTS", weights, raising=False)
    code, out, _ = run(["--num-chars", "12", "-q"], capsys)
    assert code == 0 and out == generate(model, "", 12)


def test_cache_dir_location(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXGPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == os.path.join(str(tmp_path), "jaxgpt", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "jaxgpt", "jax")
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path / "explicit"))
    assert compile_cache.cache_dir() == str(tmp_path / "explicit")
    assert compile_cache.enable() is None  # JAXGPT_NO_COMPILE_CACHE is set by the fixture


def test_second_run_reads_the_persistent_cache(weights, model, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("JAXGPT_NO_COMPILE_CACHE", None)
    env.pop("JAXGPT_CACHE_DIR", None)
    argv = [sys.executable, "-m", "jaxgpt.cli", "generate", "--weights", weights, "--num-chars", "30", "--seed", "4"]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    cache = tmp_path / "xdg" / "jaxgpt" / "jax"
    entries = {p.name for p in cache.iterdir()}
    assert any(name.startswith("jit_generate") for name in entries), entries
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout == generate(model, "", 30, seed=4)
    assert {p.name for p in cache.iterdir()} == entries  # nothing compiled anew


def test_several_prompts_json_stop_and_ban(weights, model, capsys):
    """Repeatable --prompt (rows of any lengths), --json records that reproduce the run."""
    argv = ["--weights", weights, "--prompt", "ROMEO:", "--prompt", "", "--num-chars", "40", "--seed", "3",
            "--temperature", "0.9", "--logprobs", "2", "--json", "-q"]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""
    records = [json.loads(line) for line in out.splitlines()]
    want = jaxgpt.complete(model, ["ROMEO:", ""], 40, seed=3, temperature=0.9, logprobs=2)
    assert [r["index"] for r in records] == [0, 1] and [r["stream"] for r in records] == [0, 1]
    for record, completion in zip(records, want):
        assert record["text"] == completion.text and record["finish_reason"] == "length"
        np.testing.assert_allclose(record["logprobs"], completion.logprobs, rtol=0, atol=1e-7)
        assert [list(d) for d in record["top_logprobs"]] == [list(d) for d in completion.top_logprobs]
        assert record["seed"] == 3 and record["options"]["temperature"] == 0.9
        assert record["num_chars"] == 40 and record["vocab"] is None  # None: the published map
    # A stop string from that text ends the sample before it; --ban removes characters.
    want = jaxgpt.complete(model, "", 40, seed=3, temperature=0.9) * 2  # alone: stream 0
    stop = want[1].text[10:12]
    code, out, _ = run(["--weights", weights, "--num-chars", "40", "--seed", "3", "--temperature", "0.9",
                        "--stop", stop, "-q", "--prompt", ""], capsys)
    assert code == 0 and out == want[1].text[: want[1].text.find(stop)]
    banned = want[1].text[0] + want[1].text[5]
    code, out, _ = run(["--weights", weights, "--num-chars", "60", "--seed", "3", "--ban", banned, "-q"], capsys)
    assert code == 0 and len(out) == 60 and not set(banned) & set(out)


def test_min_p_repetition_penalty_and_slots_reach_the_engine(weights, model, capsys):
    """The CLI's filters and slot count give what `complete` gives with the same values."""
    argv = ["--weights", weights, "--prompt", "ROMEO:", "--prompt", "a", "--num-chars", "30", "--seed", "5",
            "--min-p", "0.05", "--repetition-penalty", "1.3", "--slots", "4", "--json", "-q"]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""
    records = [json.loads(line) for line in out.splitlines()]
    want = jaxgpt.complete(model, ["ROMEO:", "a"], 30, seed=5, min_p=0.05, repetition_penalty=1.3, slots=4)
    assert [r["text"] for r in records] == [c.text for c in want]
    plain = jaxgpt.complete(model, ["ROMEO:", "a"], 30, seed=5, slots=4)
    assert [c.text for c in want] != [c.text for c in plain]  # the options changed something
    assert all(r["slots"] == 4 and r["options"]["min_p"] == 0.05 and r["options"]["repetition_penalty"] == 1.3
               for r in records)
