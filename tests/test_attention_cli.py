"""`jaxgpt attention`: the PNG grid, the self-contained HTML's embedded weights, one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.vocab import default_vocab
from porting import save_flax
from tests.web_helpers import random_model

CONFIG = GPTConfig(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
TEXT = "ROMEO:\nBut soft"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = random_model(CONFIG, 4)
    path = tmp_path_factory.mktemp("attention") / "small.safetensors"
    save_flax(model, path)
    return str(path), model


def run(capsys, *argv):
    code = main(["attention", *argv])
    return code, *capsys.readouterr()


def embedded_data(html: str) -> dict:
    match = re.search(r"const data = (\{.*?\});\n", html)
    assert match, "no embedded data"
    return json.loads(match.group(1))


def test_html_embeds_the_model_weights_and_the_page_script(tmp_path, capsys, checkpoint):
    weights, model = checkpoint
    out = tmp_path / "attention.html"
    code, stdout, err = run(capsys, "--text", TEXT, "--weights", weights, "--out", str(out))
    assert code == 0, err
    assert stdout == "" and "2 blocks x 3 heads over 15 characters" in err
    html = out.read_text(encoding="utf-8")
    assert "window.JaxgptAttention" in html  # the page's own view, inlined
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from anywhere
    data = embedded_data(html)
    assert data["tokens"] == list(TEXT)
    expected = np.asarray(model.attention_weights(default_vocab().encode(TEXT)[None]))[:, 0]  # (N, H, T, T)
    assert len(data["rows"]) == 2 and all(len(block) == 3 for block in data["rows"])
    for b in range(2):
        for h in range(3):
            for q, row in enumerate(data["rows"][b][h]):
                assert len(row) == q + 1  # the query and the characters before it
                np.testing.assert_allclose(row, expected[b, h, q, : q + 1], atol=6e-6)


def test_png_is_a_grid_of_heatmaps(tmp_path, capsys, checkpoint):
    from matplotlib.image import imread

    out = tmp_path / "attention.png"
    code, _, err = run(capsys, "--text", TEXT, "--weights", checkpoint[0], "--out", str(out))
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    height, width = image.shape[:2]
    assert width > height > 400  # 3 heads across, 2 blocks down, plus the colour bar
    assert image[..., :3].std() > 0.1  # something was drawn


@pytest.mark.parametrize("argv,message", [
    (["--text", "abc", "--out", "x.jpg"], "--out must end in .png or .html"),
    (["--text", "", "--out", "x.png"], "--text is empty"),
    (["--text", "a\u4e2d", "--out", "x.png"], "characters not in the vocabulary: '\u4e2d'"),
    (["--text", "a" * 17, "--out", "x.png"], "--text has 17 characters; the model's window is 16"),
    (["--text", "abc", "--out", "missing-dir/x.html"], "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, checkpoint, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, *argv, "--weights", checkpoint[0])
    assert code == 1
    assert stdout == "" and err.count("\n") == 1 and err.startswith("jaxgpt: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []
