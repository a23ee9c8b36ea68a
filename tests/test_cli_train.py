"""`jaxgpt train` and `jaxgpt eval` end to end (in-process), on a toy configuration.

Bad input of every kind must end with one `jaxgpt: error:` line, a non-zero exit and no
output directory; a good run writes checkpoints, history, curve, vocabulary and a weights.pt
that the notebook's torch class loads strictly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxgpt.cli import main
from jaxgpt.vocab import default_vocab
from tests.test_train import corpus

TOY = ["--context-length", "16", "--model-dim", "16", "--num-blocks", "1", "--num-heads", "2"]
FAST = ["--batch-size", "4", "--eval-interval", "3", "--eval-batches", "2", "--checkpoint-interval", "3",
        "--log-interval", "1", "-q"]


@pytest.fixture(autouse=True)
def no_compile_cache(monkeypatch):
    monkeypatch.setenv("JAXGPT_NO_COMPILE_CACHE", "1")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(corpus(6000), encoding="utf-8")
    return str(path)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    """One finished toy run: its --out directory."""
    out = str(tmp_path_factory.mktemp("runs") / "toy")
    assert main(["train", "--text", text_file, "--out", out, "--steps", "6", *TOY, *FAST]) == 0
    return out


def test_train_writes_every_output(trained):
    assert sorted(os.listdir(trained)) == ["checkpoints", "history.json", "loss_curve.png", "vocab.json", "weights.pt"]
    assert sorted(n for n in os.listdir(os.path.join(trained, "checkpoints")) if n.isdigit()) == ["3", "6"]
    with open(os.path.join(trained, "history.json")) as f:
        history = json.load(f)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in history if "val_loss" in r] == [3, 6]
    with open(os.path.join(trained, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(trained, "vocab.json"), encoding="utf-8") as f:
        assert "".join(json.load(f).values()) == "".join(default_vocab().chars)


def test_exported_weights_load_strictly_into_the_notebook_class(trained):
    torch = pytest.importorskip("torch")
    from porting.torch_reference import DrakeGPT

    state = torch.load(os.path.join(trained, "weights.pt"), map_location="cpu", weights_only=True)
    reference = DrakeGPT(vocab_size=104, context_length=16, model_dim=16, num_blocks=1, num_heads=2)
    reference.load_state_dict(state, strict=True)
    assert list(state) == list(reference.state_dict())  # the notebook's own key order


def test_running_a_finished_run_again_trains_nothing(trained, text_file, capsys):
    before = os.path.getmtime(os.path.join(trained, "checkpoints", "6"))
    code, out, err = run(capsys, "train", "--text", text_file, "--out", trained, "--steps", 6, *TOY, *FAST)
    assert code == 0 and "step 6" in out and err == ""
    assert os.path.getmtime(os.path.join(trained, "checkpoints", "6")) == before


def test_no_resume_refuses_an_existing_run(trained, text_file, capsys):
    code, _, err = run(capsys, "train", "--text", text_file, "--out", trained, "--steps", 6, "--no-resume", *TOY, *FAST)
    assert code == 1 and "already holds checkpoints (up to step 6)" in err and err.count("\n") == 1


def test_resume_with_other_settings_names_them(trained, text_file, capsys):
    code, _, err = run(capsys, "train", "--text", text_file, "--out", trained, "--steps", 9, "--seed", 3, *TOY, *FAST)
    assert code == 1 and "steps 6 (now 9)" in err and "seed 0 (now 3)" in err and err.count("\n") == 1


def test_eval_reports_the_loss_and_torch_agrees(trained, text_file, capsys):
    pytest.importorskip("torch")
    code, out, err = run(capsys, "eval", "--weights", trained, "--text", text_file, "--max-chars", 500,
                         "--compare-torch", "--json")
    assert code == 0, err
    doc = json.loads(out)
    jax_result = doc["jax"]
    assert jax_result["num_chars"] == 499 and jax_result["num_windows"] == 32  # 31 full windows of 16 + 3
    assert jax_result["bits_per_char"] == pytest.approx(jax_result["nats_per_char"] / np.log(2))
    assert jax_result["perplexity"] == pytest.approx(np.exp(jax_result["nats_per_char"]))
    assert doc["abs_difference_nats_per_char"] < 1e-5
    assert doc["vocab"].endswith("vocab.json")  # found beside the weights


def test_eval_text_output(trained, text_file, capsys):
    code, out, _ = run(capsys, "eval", "--weights", os.path.join(trained, "weights.pt"), "--text", text_file,
                       "--max-chars", 200, "-q")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and "199 characters predicted" in lines[0]
    assert lines[1].startswith("jaxgpt ") and "nats/char" in lines[1] and "bits/char" in lines[1] and "perplexity" in lines[1]


def test_fine_tuning_from_a_torch_checkpoint(trained, text_file, tmp_path, capsys):
    out = str(tmp_path / "tuned")
    weights = os.path.join(trained, "weights.pt")
    code, stdout, err = run(capsys, "train", "--text", text_file, "--out", out, "--init", weights, "--steps", 3,
                            "--lr", "1e-4", *FAST)
    assert code == 0, err
    import porting

    start, tuned = porting.read_checkpoint(weights), porting.read_checkpoint(os.path.join(out, "weights.pt"))
    assert tuned.config == start.config  # the checkpoint's configuration, inferred, kept
    assert any(not np.array_equal(start.params[k], tuned.params[k]) for k in start.params)
    with open(os.path.join(trained, "history.json")) as f:
        scratch_first = json.load(f)[0]["loss"]
    with open(os.path.join(out, "history.json")) as f:
        tuned_first = json.load(f)[0]["loss"]
    assert tuned_first < scratch_first  # it starts from the trained weights, not from scratch


def test_vocab_from_text_and_drop_unknown(tmp_path, capsys):
    text = tmp_path / "accents.txt"
    text.write_text("über café naïve " * 300, encoding="utf-8")
    out = str(tmp_path / "own")
    code, _, err = run(capsys, "train", "--text", text, "--out", out, "--steps", 2, "--vocab-from-text", *TOY, *FAST)
    assert code == 0, err
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        assert sorted(json.load(f).values()) == sorted(set("über café naïve "))
    out = str(tmp_path / "dropped")
    code, _, err = run(capsys, "train", "--text", text, "--out", out, "--steps", 2, "--drop-unknown",
                       *TOY, *FAST[:-1])
    assert code == 0, err
    assert "dropped 600 characters (2 distinct: 'ï', 'ü')" in err  # é is in the published map


BAD = {
    "missing text": (["--text", "{tmp}/nope.txt"], "nope.txt: text file not found"),
    "empty text": (["--text", "{empty}"], "text file is empty"),
    "unknown characters": (["--text", "{accents}"], "4 characters (1 distinct: 'ö') are not in the vocabulary"),
    "text too short": (["--text", "{short}"], "it needs more than context_length + 1"),
    "garbage --init": (["--text", "{text}", "--init", "{garbage}"], "--init {garbage}: not a checkpoint"),
    "missing --init": (["--text", "{text}", "--init", "{tmp}/none.pt"], "none.pt: no such file"),
    "conflicting --init": (["--text", "{text}", "--init", "{weights}", "--model-dim", "32"],
                           "--model-dim 32 (the checkpoint has 16)"),
    "--init vocabulary": (["--text", "{text}", "--init", "{weights}", "--vocab", "{small_vocab}"],
                          "has vocab_size 104 but the vocabulary has 3 characters"),
    "bad --vocab": (["--text", "{text}", "--vocab", "{garbage}"], "--vocab: {garbage}: not a readable vocabulary"),
    "model_dim / heads": (["--text", "{text}", "--model-dim", "10", "--num-heads", "3"],
                          "--model-dim 10 must be divisible by --num-heads 3"),
    "out is a file": (["--text", "{text}", "--out", "{text}"], "exists and is not a directory"),
    "out parent missing": (["--text", "{text}", "--out", "{tmp}/a/b"], "the parent directory"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_leaves_nothing(case, trained, text_file, tmp_path, capsys):
    files = {"tmp": str(tmp_path), "text": text_file, "weights": os.path.join(trained, "weights.pt")}
    for name, content in (("empty", ""), ("accents", "k\u00f6nig " * 4), ("short", "abc\n" * 3), ("garbage", "xx\n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        files[name] = str(tmp_path / name)
    (tmp_path / "small_vocab.json").write_text('{"0": "a", "1": "b", "2": "c"}', encoding="utf-8")
    files["small_vocab"] = str(tmp_path / "small_vocab.json")
    args, expected = BAD[case]
    args = [a.format(**files) for a in args]
    out_dir = str(tmp_path / "out")
    if "--out" not in args:
        args += ["--out", out_dir]
    if "--init" not in args:
        args += ["--context-length", "16", "--num-blocks", "1"] if "--model-dim" in args else TOY
    listing = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, "train", *args, "--steps", 2, *FAST)
    assert code == 1
    assert err.startswith("jaxgpt: error: ") and err.count("\n") == 1, err
    assert expected.format(**files) in err
    assert out == ""
    assert sorted(os.listdir(tmp_path)) == listing  # no output directory, no partial file


def test_eval_bad_inputs(trained, text_file, tmp_path, capsys):
    (tmp_path / "accents.txt").write_text("k\u00f6nig\n", encoding="utf-8")
    cases = [
        (["--weights", str(tmp_path / "none.pt"), "--text", text_file], "none.pt: no such file"),
        (["--weights", trained, "--text", str(tmp_path / "nope.txt")], "nope.txt: text file not found"),
        (["--weights", trained, "--text", str(tmp_path / "accents.txt")], "1 characters (1 distinct: 'ö')"),
    ]
    for args, expected in cases:
        code, out, err = run(capsys, "eval", *args)
        assert code == 1 and err.startswith("jaxgpt: error: ") and err.count("\n") == 1 and expected in err, err
