"""Screenshot of the page with an answered question (the README's picture).

``python -m helpers.browser --url http://127.0.0.1:8080/ --out docs/screenshot.png``
Needs Playwright (pip) and a Chromium (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DEFAULT_CHROMIUM = "/usr/bin/chromium"


def launch(playwright, executable: str = DEFAULT_CHROMIUM):
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def set_samples(page, k: int) -> None:
    """Set the page's samples slider (its number box) to ``k``."""
    box = page.locator("#vt-samples input[type=number]")
    box.fill(str(k))
    box.press("Enter")


def shoot(browser, url: str, out: Path, question: str = "What is 2+2?", locale: str = "en-US",
          timeout_ms: int = 120_000, samples: int = 1) -> Path:
    """Ask ``question`` on the page at ``url`` in an open Playwright browser and save a picture
    (``samples`` > 1: the voting view, once every sample has finished)."""
    page = browser.new_page(locale=locale, viewport={"width": 1280, "height": 900})
    try:
        page.goto(url)
        page.wait_for_selector("#vt-status :text('✔')", timeout=timeout_ms)
        if samples > 1:
            set_samples(page, samples)
        page.fill("#vt-question textarea", question)
        page.click("#vt-submit")
        if samples > 1:
            page.wait_for_selector("#vt-stats :text('samples')", timeout=timeout_ms)
            # Open one sample so the picture shows its thinking and answer, with the tally in view.
            page.locator("#vt-chat").get_by_text("Sample 1").first.click()
            page.wait_for_timeout(500)
            page.evaluate("() => document.querySelectorAll('#vt-chat *').forEach(e => {"
                          " if (e.scrollHeight > e.clientHeight) e.scrollTop = 0; })")
        else:
            page.wait_for_selector("#vt-chat .vt-final", timeout=timeout_ms)
            # Open the collapsed thinking section so the picture shows both parts.
            page.locator("#vt-chat").get_by_text("Thinking" if locale.startswith("en") else "思考过程").first.click()
        page.wait_for_timeout(500)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
    finally:
        page.close()
    return out


def take(url: str, out: Path, question: str = "What is 2+2?", locale: str = "en-US",
         executable: str = DEFAULT_CHROMIUM, samples: int = 1) -> Path:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, executable)
        try:
            return shoot(browser, url, out, question, locale, samples=samples)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/")
    parser.add_argument("--out", default="docs/screenshot.png", type=Path)
    parser.add_argument("--question", default="What is 2+2?")
    parser.add_argument("--locale", default="en-US")
    parser.add_argument("--chromium", default=DEFAULT_CHROMIUM)
    parser.add_argument("--samples", type=int, default=1, help="more than 1: the voting view")
    args = parser.parse_args()
    print(take(args.url, args.out, args.question, args.locale, args.chromium, args.samples))


if __name__ == "__main__":
    main()
