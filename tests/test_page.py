"""The page of `jaxgpt serve` in a real headless Chromium (Debian's `chromium`, driven by
Playwright's Python API through `executable_path`; nothing downloads a browser).

A small random-weight model served on 127.0.0.1. Each test gets a fresh browser context that
records console errors, page errors and every request: a request to any other origin is
aborted and fails the test. Without a Chromium the tests are skipped, except where
JAXGPT_REQUIRE_BROWSER=1 (CI installs one, so there they must run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.vocab import default_vocab
from tests.web_helpers import random_model

CHROMIUM = os.environ.get("JAXGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
def _skip_or_fail(reason: str):
    if os.environ.get("JAXGPT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and JAXGPT_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if CHROMIUM is None:
    _skip_or_fail("no chromium on PATH (Debian: apt-get install -y chromium)")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    _skip_or_fail("the playwright Python package is not installed")

CONFIG = GPTConfig(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
SLOTS = 4
IDS = ("prompt", "max-chars", "temperature", "top-k", "top-p", "min-p", "seed", "random-seed", "mode", "stop",
       "generate", "cancel", "output", "status")
DESKTOP = dict(viewport={"width": 1280, "height": 900})
PHONE = dict(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, 12)


@pytest.fixture(scope="module")
def server(model):
    """The served app on 127.0.0.1 at a free port; yields its URL."""
    from jaxgpt.serving.app import create_app
    from jaxgpt.serving.server import serve_in_thread

    app = create_app(model, vocab=default_vocab(), max_batch=SLOTS, max_tokens=200_000, warm_up=False)
    server, thread = serve_in_thread(app, "127.0.0.1", 0)
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        # As root (CI containers) Chromium refuses to start without --no-sandbox.
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


class Session:
    """A browser context on the server, recording what the page does wrong."""

    def __init__(self, browser, origin: str, **context):
        self.origin = origin
        self.context = browser.new_context(**context)
        self.errors, self.foreign = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.origin + "/") or url.startswith("file://"):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def check(self):
        assert self.foreign == [], f"requests to other origins: {self.foreign}"
        assert self.errors == [], self.errors


@pytest.fixture
def session(browser, server):
    s = Session(browser, server, **DESKTOP)
    yield s
    try:
        s.check()
    finally:
        s.context.close()


def open_page(s: Session):
    s.page.goto(s.origin + "/")
    s.page.wait_for_function("document.getElementById('model-info').textContent.includes('slots')")
    return s.page


def generate(page, prompt="ROMEO:", max_chars=40, seed=7, temperature=0.9, top_k=20, key=None):
    """Fills the form and generates: a click, or `key` pressed ("Control+Enter" in the prompt,
    "Enter" in the seed field)."""
    page.fill("#prompt", prompt)
    page.fill("#max-chars", str(max_chars))
    page.fill("#seed", str(seed))
    page.fill("#temperature", str(temperature))
    page.fill("#top-k", str(top_k))
    if key is not None:
        page.focus("#prompt" if key == "Control+Enter" else "#seed")
        page.keyboard.press(key)
    else:
        page.click("#generate")
    page.wait_for_selector("#status[data-state=done]", timeout=60_000)
    return {"prompt": prompt, "max_tokens": max_chars, "seed": seed, "temperature": temperature, "top_k": top_k}


def api(server, body):
    response = httpx.post(server + "/v1/completions", json={**body, "logprobs": 5}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_page_loads_with_every_control_and_nothing_from_elsewhere(session):
    page = open_page(session)
    for element_id in IDS:
        assert page.locator(f"#{element_id}").count() == 1, element_id
    assert page.title() == "jaxgpt"
    # The local stylesheet applied (no fallback look), and the model line came from /health.
    assert page.eval_on_selector("header.top", "e => getComputedStyle(e).backgroundColor") == "rgb(15, 23, 42)"
    assert "2 blocks \u00d7 3 heads, context 16" in page.text_content("#model-info")
    page.click("#random-seed")
    assert re.fullmatch(r"\d+", page.input_value("#seed"))


def test_fixed_seed_generation_shows_exactly_the_api_text(session, server):
    page = open_page(session)
    body = generate(page, prompt="ROMEO:\nBut", key="Control+Enter")
    shown = page.text_content("#output")
    choice = api(server, body)
    assert shown == choice["text"] and len(shown) == 40
    status = page.text_content("#status")
    assert "finish reason: length" in status and "seed 7" in status and "chars/s" in status
    # "Copy as command": the exact options of this text, for the CLI and for curl.
    page.click("#copy-command")
    cli, curl = page.text_content("#command").split("\n")
    assert cli == ("jaxgpt generate --prompt $'ROMEO:\\nBut' --num-chars 40 --seed 7 --temperature 0.9 "
                   f"--top-k 20 --slots {SLOTS}")
    words = shlex.split(curl)
    assert words[:3] == ["curl", "-s", f"{server}/v1/completions"] and words[-2] == "-d"
    sent = json.loads(words[-1])
    assert api(server, sent)["text"] == shown


def test_copied_command_reproduces_the_text_in_the_cli(session, model, tmp_path, capsys, monkeypatch):
    """The "copy as command" line, parsed by bash and run by `jaxgpt generate` on the served
    checkpoint, prints exactly the page's text (the seed-exact engine at the server's slots)."""
    from jaxgpt.cli import _register_all, app, main
    from porting import save_flax

    _register_all()
    flags = {opt for param in app.commands["generate"].params for opt in param.opts}
    if "--slots" not in flags:
        pytest.skip("jaxgpt generate has no --slots yet (issue 12): the line cannot be exact")
    page = open_page(session)
    generate(page, prompt="ROMEO:\nBut", max_chars=30, top_k=10)
    page.fill("#stop", "")
    page.click("#copy-command")
    line = page.text_content("#command").split("\n")[0]
    argv = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, check=True).stdout
    argv = argv.decode().split("\0")[:-1]
    assert argv[:2] == ["jaxgpt", "generate"]
    weights = tmp_path / "served.safetensors"
    save_flax(model, weights)
    monkeypatch.setenv("JAXGPT_NO_COMPILE_CACHE", "1")
    assert main([*argv[1:], "--weights", str(weights), "--quiet"]) == 0
    assert capsys.readouterr().out == page.text_content("#output")


def test_cancel_frees_the_slot(session, server):
    page = open_page(session)
    page.fill("#max-chars", "150000")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#output .ch').length > 0", timeout=60_000)
    assert httpx.get(server + "/health").json()["slots"]["busy"] == 1
    page.keyboard.press("Escape")
    page.wait_for_selector("#status[data-state=cancelled]")
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["slots"]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["slots"] == {"total": SLOTS, "busy": 0, "free": SLOTS}
    assert 0 < page.locator("#output .ch").count() < 150000
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_popover_lists_the_five_likeliest_characters(session, server):
    page = open_page(session)
    body = generate(page, key="Enter")
    choice = api(server, body)
    i = 5
    page.hover(f"#output .ch >> nth={i}")
    page.wait_for_selector("#popover:not([hidden])")
    items = page.locator("#popover li")
    assert items.count() == 5
    expected = choice["logprobs"]["top_logprobs"][i]
    glyph = {"\n": "\u21b5", " ": "\u2423"}
    labels = [items.nth(k).locator("span").first.text_content() for k in range(5)]
    shown = [float(items.nth(k).locator(".pct").text_content().rstrip("%")) for k in range(5)]
    assert sorted(labels) == sorted(glyph.get(c, c) for c in expected)
    assert shown == sorted(shown, reverse=True)  # likeliest first
    assert shown[0] == pytest.approx(100 * np.exp(max(expected.values())), abs=0.051)  # shown to 0.1 or 0.01
    p = np.exp(choice["logprobs"]["token_logprobs"][i])
    assert f"p = {100 * p:.{1 if p >= 0.1 else 2}f}%" in page.text_content("#popover .head")
    # The surprisal toggle colours every character.
    page.check("#surprisal")
    colours = page.eval_on_selector_all("#output .ch", "s => s.map(e => getComputedStyle(e).backgroundColor)")
    assert len(colours) == 40 and "rgba(0, 0, 0, 0)" not in colours and len(set(colours)) > 1


def test_attention_view_renders_for_a_character(session, model):
    page = open_page(session)
    generate(page, prompt="ROMEO:")
    i = 20  # context "ROMEO:" + 40 characters: character 20 sees the 16 characters ending at it
    page.click(f"#output .ch >> nth={i}")
    page.wait_for_selector(".attn-text")
    assert page.locator(".attn-text").count() == CONFIG.num_heads  # all heads of block 0
    context = "ROMEO:" + page.text_content("#output")
    window = context[6 + i + 1 - 16: 6 + i + 1]
    expected = np.asarray(model.attention_weights(default_vocab().encode(window)[None]))[:, 0, :, -1]  # (N, H, T)
    for block in range(CONFIG.num_blocks):
        page.select_option("#attn-block", str(block))
        panels = page.locator(".attn-text")
        for head in range(CONFIG.num_heads):
            weights = panels.nth(head).locator(".attn-ch").evaluate_all("s => s.map(e => Number(e.dataset.weight))")
            np.testing.assert_allclose(weights, expected[block, head], atol=1e-6)
    shown = page.locator(".attn-text").first.locator(".attn-ch").all_text_contents()
    assert shown == ["\u21b5\n" if c == "\n" else c for c in window]  # a newline drawn as a visible arrow
    page.select_option("#attn-head", "1")
    assert page.locator(".attn-text").count() == 1
    # From the keyboard: #output is one tab stop, arrows move between characters, Enter shows.
    page.focus("#output")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.attn-caption').textContent.includes('position 7 ')")
    assert page.locator("#output .ch.selected").get_attribute("data-index") == "1"
    assert page.locator("#popover li").count() == 5


def test_phone_viewport_fits_and_taps_show_the_popover(browser, server):
    s = Session(browser, server, **PHONE)
    try:
        page = open_page(s)
        generate(page)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.tap("#output .ch >> nth=3")
        page.wait_for_selector("#popover:not([hidden])")
        box = page.locator("#popover").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        page.wait_for_selector(".attn-text")
        s.check()
    finally:
        s.context.close()


def test_text_contrast_is_readable(session):
    """WCAG AA: every text colour against its effective background at 4.5:1 or more."""
    page = open_page(session)
    generate(page)
    page.check("#surprisal")
    page.click("#output .ch >> nth=10")
    page.wait_for_selector(".attn-ch")
    worst = page.evaluate("""() => {
      const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
      const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
        .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
      const background = (e) => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length < 4 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
      const selectors = ["label", "#status", "#output .ch", ".attn-ch", ".attn-caption", ".hint", "#model-info",
                         "button:not(:disabled)", "h2", "#prompt"];
      let worst = [Infinity, ""];
      for (const sel of selectors) for (const e of document.querySelectorAll(sel)) {
        const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        if (ratio < worst[0]) worst = [ratio, sel];
      }
      return worst;
    }""")
    assert worst[0] >= 4.5, worst


def test_attention_html_of_the_cli_works_offline(browser, tmp_path, monkeypatch):
    from jaxgpt.cli_attention import attention_html

    text = "ROMEO:\nBut soft"
    model = random_model(CONFIG, 3)
    weights = np.asarray(model.attention_weights(default_vocab().encode(text)[None]))[:, 0]
    path = tmp_path / "attention.html"
    path.write_text(attention_html(weights, text, "test"), encoding="utf-8")
    s = Session(browser, "file://", **DESKTOP)
    try:
        s.page.goto(path.as_uri())
        s.page.wait_for_selector(".attn-text")
        assert s.page.locator(".attn-text").count() == CONFIG.num_heads
        s.page.click("#output .ch >> nth=4")
        shown = s.page.locator(".attn-text").first.locator(".attn-ch").evaluate_all(
            "s => s.map(e => Number(e.dataset.weight))")
        np.testing.assert_allclose(shown, weights[0, 0, 4, :5], atol=6e-6)
        s.check()
    finally:
        s.context.close()
