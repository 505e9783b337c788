"""The Gradio demo: handlers (no browser), then the real app in headless Chromium via Playwright.

The browser test starts the app on localhost, clicks Generate, waits for the images and the NFE
line, checks a visible error for an unknown model path, and saves a screenshot to
``$FEWSTEP_SCREENSHOT`` (default: a temporary file). It skips, saying why, when gradio, the
Python ``playwright`` package or a Chromium binary (``/usr/bin/chromium`` from Debian's
``chromium`` package, or ``$FEWSTEP_CHROMIUM``) is missing.
"""

from __future__ import annotations

import html
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'fewstep[demo]')")

from fewstep.apps import demo as demo_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chromium() -> str | None:
    for cand in (os.environ.get("FEWSTEP_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return cand
    return None


def test_handlers_generate_compare_and_validate():
    app = demo_mod.build_demo()
    assert isinstance(app, gr.Blocks)
    items, status = demo_mod.run_generate("digits", "", "3,7", "dpmpp-2m", 3, "cfg", "scale=2.0", "", 0, 2)
    assert len(items) == 2 and items[0][1] == "3" and items[0][0].size == (64, 64)
    assert "NFE 6" in status and "fewstep-ok" in status
    # same seed twice -> same images (no state carried between requests)
    again, _ = demo_mod.run_generate("digits", "", "3,7", "dpmpp-2m", 3, "cfg", "scale=2.0", "", 0, 2)
    assert np.array_equal(np.asarray(items[0][0]), np.asarray(again[0][0]))
    bad = [
        (("digits", "", "0-9", "dpmpp-2m", 99, "cfg", "scale=2", "", 0, 2), "steps must be an integer in 1..50"),
        (("digits", "", "0-9", "dpmpp-2m", 4, "cfg", "scale=2", "", 0, 64), "batch size"),
        (("/no/such/model", "", "0-9", "dpmpp-2m", 4, "cfg", "scale=2", "", 0, 2), "no such folder"),
        (("digits", "", "0-9", "dpmpp-2m", 4, "cfg", "scale=abc", "", 0, 2), "finite number"),
        (("digits", "", "0-9", "dpmpp-2m", 4, "cfg", "scale=2", "bogus=1", 0, 2), "bogus"),
        (("digits", "", "0-99", "dpmpp-2m", 4, "cfg", "scale=2", "", 0, 2), "labels"),
        (("digits", "", "0-9", "nope", 4, "cfg", "scale=2", "", 0, 2), "scheduler 'nope' is unknown"),
    ]
    for args, msg in bad:
        items, status = demo_mod.run_generate(*args)
        status = html.unescape(status)
        assert items == [] and "Error" in status and msg in status, (args, status)
    items, status = demo_mod.run_compare("digits", "", "1", 3, 0, 2, "dpmpp-2m | cfg:2\nddim | none")
    assert len(items) == 2 and "dpmpp-2m | cfg:scale=2.0: NFE 6" in items[0][1] and "NFE 3" in items[1][1]
    assert "<table>" in status
    items, status = demo_mod.run_compare("digits", "", "1", 3, 0, 2, "dpmpp-2m | cfg:2")
    assert items == [] and "at least two" in status


def test_concurrent_requests_do_not_interfere():
    """Two users at once (threads, as Gradio runs handlers) get exactly their serial results, and
    the shared pipeline is restored afterwards (scheduler, no guidance hook left behind)."""
    from concurrent.futures import ThreadPoolExecutor

    from fewstep.apps.loading import load_model
    from fewstep.guidance.spec import guidance_names

    a = ("digits", "", "2", "dpmpp-2m-sde", 3, "cfg", "scale=3", "", 1, 2)
    b = ("digits", "", "5", "ddim", 3, "none", "", "", 1, 2)
    if "apg" in guidance_names():
        b = ("digits", "", "5", "ddim", 3, "apg", "scale=2,momentum=-0.5", "", 1, 2)
    serial = [demo_mod.run_generate(*a), demo_mod.run_generate(*b)]
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(demo_mod.run_generate, *args) for args in (a, b, a, b)]
        both = [f.result() for f in futs]
    for got, want in zip(both, serial * 2):
        assert "NFE" in got[1]
        assert len(got[0]) == len(want[0])
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for (p, _), (q, _) in zip(got[0], want[0]))
    pipe = load_model("digits", "auto").pipe
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert getattr(pipe, "_fewstep_guidance", None) is None and "forward" not in vars(pipe.unet)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.browser
def test_demo_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python playwright package is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary: install Debian's `chromium` package (apt-get install -y chromium) "
                    "or set FEWSTEP_CHROMIUM")
    shot = Path(os.environ.get("FEWSTEP_SCREENSHOT") or tmp_path / "demo.png")
    app = demo_mod.build_demo(preload=True)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#generate").click()
            status = page.locator("#status")
            try:
                page.wait_for_function(
                    "() => document.querySelectorAll('#gallery img').length >= 8", timeout=20_000)
            except sync_api.TimeoutError:
                pytest.fail(f"no images after Generate; status box says: {status.inner_text()!r}")
            status.get_by_text("NFE 16").wait_for()
            assert "8 images" in status.inner_text()  # the default batch size
            imgs = page.locator("#gallery img")
            assert imgs.count() >= 8
            # the <img> elements appear before their data has loaded: wait for a decoded image
            page.wait_for_function(
                "() => { const im = document.querySelector('#gallery img');"
                " return im !== null && im.complete && im.naturalWidth > 0; }", timeout=20_000)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            # a visible error for an unknown model path
            box = page.locator("#model").locator("textarea, input").first
            box.fill("/no/such/model")
            page.locator("#generate").click()
            status.get_by_text("Error").wait_for()
            assert "no such folder" in status.inner_text()
            browser.close()
    finally:
        app.close()
    assert shot.exists() and shot.stat().st_size > 1000
