"""`jaxgpt attention`: the softmax attention of every block and head over a text, as a picture.

    jaxgpt attention --text "ROMEO: But soft" --out attention.png    # grid of heatmaps
    jaxgpt attention --text "ROMEO: But soft" --out attention.html   # interactive, self-contained

The PNG has one heatmap per block (rows) and head (columns): row t, column s is how much the
character at t attended to the one at s (zero above the diagonal), characters on both axes.
The HTML is the attention view of the page `jaxgpt serve` serves (the same script and style,
inlined, with the weights embedded): click a character to see what it attended to, per head or
all heads of a block at once. It makes no request anywhere.

The text is encoded at positions 0..T-1 as one window (T <= the checkpoint's context_length),
as the notebook's loop encodes its context.
"""

from __future__ import annotations

import json
import math
import os
import sys
from importlib import resources

import click
import numpy as np

from jaxgpt.cli import CLIError, load_model

MAX_TICK_LABELS = 64  # per axis; longer texts label every k-th character
HTML_DECIMALS = 5  # weights embedded in the HTML, rounded for size (display only)


def display_char(ch: str) -> str:
    """A visible label for a character: newline, space and tab get symbols."""
    return {"\n": "\u21b5", " ": "\u2423", "\t": "\u21e5"}.get(ch, ch)


def attention_png(weights: np.ndarray, chars: str, path: str) -> None:
    """Writes the grid of heatmaps.

    Args:
      weights: `(N, H, T, T)` probabilities of one text.
      chars: the T characters.
      path: destination file (the caller makes it atomic).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    n, h, t, _ = weights.shape
    panel = min(7.0, max(2.4, 0.11 * t))  # inches per heatmap
    fig = Figure(figsize=(panel * h + 1.2, panel * n + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    step = math.ceil(t / MAX_TICK_LABELS)
    ticks = np.arange(0, t, step)
    labels = [display_char(chars[i]) for i in ticks]
    fontsize = max(4.0, min(9.0, panel * 72 / len(ticks) * 0.8))
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # square-root scale: small weights stay visible
    axes = fig.subplots(n, h, squeeze=False)
    image = None
    for i in range(n):
        for j in range(h):
            ax = axes[i][j]
            image = ax.imshow(weights[i, j], cmap="Blues", norm=norm, interpolation="nearest")
            ax.set_title(f"block {i} \u00b7 head {j}", fontsize=9)
            ax.set_xticks(ticks, labels, fontsize=fontsize, fontfamily="monospace")
            ax.set_yticks(ticks, labels, fontsize=fontsize, fontfamily="monospace")
            ax.tick_params(length=0, pad=1)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (row: query, column: key; square-root scale)")
    shown = chars if len(chars) <= 80 else chars[:77] + "..."
    fig.suptitle(f"attention over {t} characters: {shown!r}", fontsize=11)
    fig.savefig(path, format="png")


def attention_html(weights: np.ndarray, chars: str, title: str) -> str:
    """The self-contained interactive page: the served page's attention script and style inlined.

    Args:
      weights: `(N, H, T, T)` probabilities of one text.
      chars: the T characters.
      title: shown at the top (the checkpoint).
    """
    static = resources.files("jaxgpt.serving") / "static"
    script = (static / "attention.js").read_text(encoding="utf-8")
    style = (static / "style.css").read_text(encoding="utf-8")
    rows = [[[np.round(weights[b, hd, q, : q + 1].astype(np.float64), HTML_DECIMALS).tolist() for q in range(len(chars))]
             for hd in range(weights.shape[1])] for b in range(weights.shape[0])]  # [N][H][T][q + 1]
    data = json.dumps({"tokens": list(chars), "rows": rows}, separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # no "</script>" can end the data early
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jaxgpt attention</title>
<style>
{style}
</style>
</head>
<body>
<main class="standalone">
<h1>Attention</h1>
<p class="hint">{esc(title)}. Click (or focus and press Enter on) a character to see how much it
attended to each earlier character, for one head or all heads of a block.</p>
<div id="output" class="output" tabindex="-1"></div>
<section id="attention" class="attention" aria-live="polite"></section>
</main>
<script>
{script}
</script>
<script>
"use strict";
(function () {{
  const data = {data};
  const output = document.getElementById("output");
  const view = JaxgptAttention.mount(document.getElementById("attention"));
  function select(q) {{
    output.querySelectorAll(".ch.selected").forEach((s) => s.classList.remove("selected"));
    output.children[q].classList.add("selected");
    view.show({{tokens: data.tokens, query: q, weights: data.rows.map((b) => b.map((h) => h[q]))}});
  }}
  data.tokens.forEach((ch, q) => {{
    const span = document.createElement("span");
    span.className = "ch";
    span.tabIndex = 0;
    span.textContent = JaxgptAttention.glyph(ch);
    span.addEventListener("click", () => select(q));
    span.addEventListener("keydown", (e) => {{ if (e.key === "Enter") select(q); }});
    output.appendChild(span);
  }});
  select(data.tokens.length - 1);
}})();
</script>
</body>
</html>
"""


@click.command("attention")
@click.option("--text", type=str, required=True, help="Characters to encode as one window (1..context_length).")
@click.option("--weights", type=str, default=None, metavar="PATH",
              help="Checkpoint: torch .pt, .safetensors or jaxgpt orbax directory [default: the bundled one].")
@click.option("--vocab", type=str, default=None, metavar="JSON",
              help="id -> character JSON [default: vocab.json beside the weights, else the published 104 characters].")
@click.option("--out", type=str, required=True, metavar="FILE.png|FILE.html", help="Picture to write.")
def attention_command(text, weights, vocab, out) -> None:
    """Draw every block's and head's attention over TEXT (PNG heatmaps or interactive HTML)."""
    kind = os.path.splitext(out)[1].lower()
    if kind not in (".png", ".html", ".htm"):
        raise CLIError(f"--out must end in .png or .html, got {out!r}")
    if not text:
        raise CLIError("--text is empty")

    from jaxgpt.atomic import atomic_file, write_text

    model, path, characters, _ = load_model(weights, vocab)
    config = model.config
    unknown = characters.unknown_chars(text)
    if unknown:
        raise CLIError(f"--text: characters not in the vocabulary: {', '.join(repr(c) for c in unknown[:10])}")
    if len(text) > config.context_length:
        raise CLIError(f"--text has {len(text)} characters; the model's window is {config.context_length}")

    weights_ = np.asarray(model.attention_weights(characters.encode(text)[None]))[:, 0]  # (N, H, T, T)
    if kind == ".png":
        with atomic_file(out) as tmp:
            attention_png(weights_, text, tmp)
    else:
        title = f"{os.path.basename(path)}: {config.variant}, {config.num_blocks} blocks x {config.num_heads} heads"
        write_text(out, attention_html(weights_, text, title))
    print(f"jaxgpt: wrote {out} ({config.num_blocks} blocks x {config.num_heads} heads over {len(text)} characters)",
          file=sys.stderr)


def register(app) -> None:
    app.add_command(attention_command)
