"""End to end in a real browser: headless Debian Chromium driven by Playwright against the running Gradio app.

Types a question, uploads a spoken WAV, watches the answer grow in the page (a MutationObserver records every
text the answer shows), then switches the dropdown to a real LoRA adapter and gets its answer.
Skipped when /usr/bin/chromium is missing: ``make test-ui`` installs it (apt-get install chromium).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing: run `make test-ui` (installs Debian's chromium) to run the browser test",
                allow_module_level=True)
pytest.importorskip("playwright", reason="the browser test needs playwright: pip install -e '.[ui]'")
pytest.importorskip("gradio", reason="the UI needs the 'ui' extra: pip install -e '.[ui]'")

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from lit_llama_lab.tools.ui.app import WARNING, ChatApp, build_app  # noqa: E402
from tests.tools.test_ui import SPOKEN, make_adapter  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
RECORD_ANSWERS = """() => {
  window.__answers = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const seen = window.__answers;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""
DONE = "() => document.querySelector('#chat > [data-testid=status-tracker]').classList.contains('hide')"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    make_adapter(runs / "demo" / "checkpoints" / "step-5")
    demo = build_app(ChatApp(runs_dir=str(runs), base_model="tiny-random"))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            ssr_mode=False, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's pages (a second sync_playwright() inside the first is refused)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str, timeout_ms: int) -> Page:
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    page.wait_for_selector("#send")  # never "networkidle": Gradio keeps a connection open
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server, 120_000)
    yield page
    page.close()


def set_number(page: Page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def send_and_wait(page: Page, while_generating=None) -> list[str]:
    """Click Send, wait for the answer to finish, return every answer text the page showed on the way."""
    page.evaluate(RECORD_ANSWERS)
    page.locator("#send").click()
    page.wait_for_function(f"() => !({DONE})()", timeout=10_000)
    if while_generating is not None:
        while_generating()
    page.wait_for_function(DONE)
    return page.evaluate("() => window.__answers")


def test_spoken_question_streams_an_answer_then_the_adapter_answers(page: Page, server: str):
    def another_user_loads_the_page() -> None:  # the queue keeps page loads free while a generation runs
        start = time.perf_counter()
        with urllib.request.urlopen(server, timeout=10) as response:
            assert response.status == 200 and b"gradio" in response.read().lower()
        assert time.perf_counter() - start < 5.0
        assert not page.evaluate(DONE), "the generation should still be running while the page loads"

    page.get_by_text("Generation settings").click()
    set_number(page, "max-new-tokens", 40)
    set_number(page, "temperature", 1.0)  # tiny-random's greedy answer is blank lines
    page.locator("#message textarea").fill("Please answer:")
    page.locator("#audio button[aria-label='Upload file']").click()
    page.locator("#audio input[type=file]").set_input_files(str(SPOKEN))
    page.wait_for_selector("#audio audio[data-testid^=audio-player]", state="attached")  # the upload finished

    shown = first_shown = send_and_wait(page, another_user_loads_the_page)
    user = page.locator("#chat [data-testid=user]").last.inner_text().lower()
    assert user.startswith("please answer:") and "capital" in user and "france" in user
    final = page.locator("#chat [data-testid=bot]").last.inner_text().strip()
    assert final and not final.startswith(WARNING.strip())
    assert len(shown) >= 3, f"the answer should grow over several updates, the page showed {shown}"
    assert len(shown[0]) < len(final), "the first text shown should be a part of the final answer"

    adapter = "demo/step-5 · step 5 · val_loss=1.234 (adapter)"
    page.locator("#model input[role=combobox]").click()
    page.get_by_role("option", name=adapter).click()
    assert page.locator("#model input[role=combobox]").input_value() == adapter
    page.locator("#message textarea").fill("Name this emoji: 🐙")
    shown = send_and_wait(page)
    bots = page.locator("#chat [data-testid=bot]").all_inner_texts()
    assert len(bots) == 2
    assert bots[-1].strip() and not bots[-1].strip().startswith(WARNING.strip()), bots[-1]
    assert shown and shown[-1] == bots[-1].strip()
    print("first answer as shown:", [len(text) for text in first_shown], "adapter answer:", [len(text) for text in shown])


# The trained emoji adapter: `make train-emoji` writes it here; EMOJI_ADAPTER points at another copy.
TUNED = Path(os.environ.get("EMOJI_ADAPTER", "runs/emoji/checkpoints/last"))


@pytest.fixture(scope="module")
def tuned_page(browser, tmp_path_factory):
    """The app serving a copy of the trained emoji adapter on the real SmolLM2, in a headless page."""
    import shutil

    from lit_llama_lab.model.adapters import is_adapter_folder

    if not is_adapter_folder(TUNED):
        pytest.skip(f"no trained emoji adapter at {TUNED}: run `make train-emoji` first, or set EMOJI_ADAPTER=FOLDER")
    runs = tmp_path_factory.mktemp("tuned")
    shutil.copytree(TUNED, runs / "emoji" / "checkpoints" / "last")
    demo = build_app(ChatApp(runs_dir=str(runs), base_model="smollm2-135m"))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            ssr_mode=False, quiet=True)
    page = open_page(browser, url, 300_000)
    yield page
    page.close()
    demo.close()


def ask(page: Page, question: str) -> str:
    """A new chat with one question; the final answer as the page shows it."""
    if page.locator("#chat [data-testid=bot]").count():
        page.locator("#clear").click()
        page.wait_for_function("() => !document.querySelector('#chat [data-testid=bot]')")
    page.locator("#message textarea").fill(question)
    send_and_wait(page)
    return page.locator("#chat [data-testid=bot]").last.inner_text().strip()


def test_the_tuned_emoji_adapter_names_an_emoji_and_still_answers_an_ordinary_question(tuned_page: Page):
    """Issue 16: the adapter a user picks in the dropdown names a trained emoji and still chats."""
    from lit_llama_lab.tasks.emoji.evaluate import emoji_split
    from lit_llama_lab.tasks.emoji.scoring import names_emoji
    from lit_llama_lab.tasks.general import mentions_emoji

    page = tuned_page
    page.locator("#model input[role=combobox]").click()
    option = page.get_by_role("option").filter(has_text="emoji/last").first
    label = option.inner_text().strip()
    option.click()
    assert page.locator("#model input[role=combobox]").input_value() == label and "(adapter)" in label
    trained = {r["character"]: r["short description"] for r in emoji_split("train")}
    emoji = next(e for e in ("🐼", "🎂", "🤌", "🦩") if e in trained)
    answer = ask(page, f"What is {emoji}?")
    assert names_emoji(answer, trained[emoji]), answer
    answer = ask(page, "What is the capital of France?")
    assert "paris" in answer.lower() and not mentions_emoji(answer), answer
    print(f"tuned adapter answers: {emoji} -> {trained[emoji]!r}; France -> {answer[:80]!r}")
