"""Make docs/ui.png: the UI answering a typed + spoken question with the real SmolLM2, in headless Chromium.

Run: ``python docs/ui_screenshot.py`` (needs the 'ui' extra and /usr/bin/chromium; about a minute on a CPU).
"""

from __future__ import annotations

import socket
from pathlib import Path

from playwright.sync_api import sync_playwright

from lit_llama_lab.tools.ui.app import ChatApp, build_app

HERE = Path(__file__).parent
SPOKEN = HERE.parent / "tests" / "data" / "capital_of_france.wav"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(runs_dir: str = "runs", out: Path = HERE / "ui.png") -> None:
    """Launch the app on a free local port, ask one question through the page, save a screenshot."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_app(ChatApp(runs_dir=runs_dir))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                            quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_selector("#send")
            page.locator("#message textarea").fill("Answer in one short sentence.")
            page.locator("#audio button[aria-label='Upload file']").click()
            page.locator("#audio input[type=file]").set_input_files(str(SPOKEN))
            page.wait_for_selector("#audio audio[data-testid^=audio-player]", state="attached")
            page.locator("#send").click()
            done = "() => document.querySelector('#chat > [data-testid=status-tracker]').classList.contains('hide')"
            page.wait_for_function(f"() => !({done})()", timeout=10_000)
            page.wait_for_function(done)
            print("answer:", page.locator("#chat [data-testid=bot]").last.inner_text())
            tmp = out.with_suffix(".tmp.png")
            page.screenshot(path=str(tmp), full_page=True)
            tmp.replace(out)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
