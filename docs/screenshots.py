"""Screenshots of the page `jaxgpt serve` serves, desktop and phone, for the README.

    python docs/screenshots.py [--weights PATH] [--out docs/]

Serves the checkpoint (default: the bundled one) on 127.0.0.1, generates with a fixed seed in
Debian's headless chromium (Playwright through executable_path, as tests/test_page.py does),
opens a character's popover and attention view, and writes page-desktop.png and page-phone.png.
"""

from __future__ import annotations

import argparse
import os
import shutil

PROMPT = "ROMEO:\n"
VIEWPORTS = {
    "page-desktop.png": dict(viewport={"width": 1280, "height": 860}),
    "page-phone.png": dict(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True),
}


def shoot(url: str, out: str, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=chromium, args=args)
        for name, context in VIEWPORTS.items():
            page = browser.new_context(**context).new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model-info').textContent.includes('slots')")
            page.fill("#prompt", PROMPT)
            page.fill("#max-chars", "240")
            page.fill("#seed", "1")
            page.fill("#top-k", "40")
            page.click("#generate")
            page.wait_for_selector("#status[data-state=done]", timeout=120_000)
            page.check("#surprisal")
            target = "#output .ch >> nth=60"
            page.click(target)
            page.wait_for_selector(".attn-text")
            if context.get("has_touch"):
                page.locator("#result").scroll_into_view_if_needed()
                page.tap(target)
            else:
                page.hover(target)
            page.wait_for_selector("#popover:not([hidden])")
            page.screenshot(path=os.path.join(out, name), full_page=not context.get("has_touch"))
            print("wrote", os.path.join(out, name))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    chromium = os.environ.get("JAXGPT_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        raise SystemExit("screenshots: no chromium on PATH (apt-get install -y chromium)")

    import jaxgpt
    from jaxgpt.serving.app import create_app
    from jaxgpt.serving.server import serve_in_thread
    from porting import load_weights

    model = load_weights(args.weights or jaxgpt.DEFAULT_WEIGHTS)
    server, thread = serve_in_thread(create_app(model, max_batch=4), "127.0.0.1", 0)
    try:
        shoot(server.url + "/", args.out, chromium)
    finally:
        server.should_exit = True
        thread.join(30)


if __name__ == "__main__":
    main()
