"""Time from dropping one photo on the web app's page to its first protected photo on screen (issue 26).

    PYTHONPATH=. .venv/bin/python tools/app_first_photo.py [--strength mid] [--photo N] [--repeats 2]

Starts the real app on a free loopback port (every judge, the defaults of `faceveil app`), opens the page in
headless chromium (Playwright), drops the sample photo, presses Protect and waits until the result is shown. The
first drop includes loading the models (a fresh app); later ones reuse them. Prints one JSON line per drop."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faceveil  # noqa: E402
from faceveil.app import RunningApp  # noqa: E402
from tests.test_app import drop_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strength", default="mid")
    parser.add_argument("--photo", type=int, default=1, help="index of the sample photo")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="faceveil-app-timing-"))
    app = RunningApp(root)
    photo = faceveil.sample_photos()[args.photo]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            for repeat in range(args.repeats):
                page = browser.new_page(bypass_csp=True)
                page.goto(app.url)
                page.wait_for_selector("body[data-ready=true]")
                page.check(f"#strength-{args.strength}")
                started = time.perf_counter()
                drop_files(page, "drop-protect", [photo])
                page.wait_for_function("document.querySelectorAll('#photos-protect li').length === 1")
                page.click("#protect-button")
                page.wait_for_selector("#results-protect .result img.after", timeout=1800000)
                page.wait_for_function("[...document.querySelectorAll('#results-protect img.after')]"
                                       ".every((i) => i.complete && i.naturalWidth > 0)")
                seconds = time.perf_counter() - started
                faces = page.locator("#results-protect .verdicts li").all_inner_texts()
                print(json.dumps({"drop": repeat + 1, "models_loaded_before": repeat > 0, "photo": photo.name,
                                  "strength": args.strength, "seconds_drop_to_first_photo": round(seconds, 1),
                                  "verdicts": faces}), flush=True)
                page.close()
            browser.close()
    finally:
        app.stop()


if __name__ == "__main__":
    main()
