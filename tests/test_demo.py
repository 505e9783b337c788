"""The Gradio demo: handlers (no browser), then the real app in headless Chromium via Playwright.

The browser test starts the app on localhost, clicks Generate, waits for the images and the NFE
line, checks a visible error (``gr.Error``) for an unknown model path, and saves a screenshot to
``$FEWSTEP_SCREENSHOT`` (default: a temporary file). It skips, saying why, when gradio, the
Python ``playwright`` package or a Chromium binary (``/usr/bin/chromium`` from Debian's
``chromium`` package, or ``$FEWSTEP_CHROMIUM``) is missing.
"""

from __future__ import annotations

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
    for args, msg in bad:  # gr.Error: shown in the page, and a failed call for API clients
        with pytest.raises(gr.Error) as info:
            demo_mod.run_generate(*args)
        assert msg in info.value.message, (args, info.value.message)
    items, status = demo_mod.run_compare("digits", "", "1", 3, 0, 2, "dpmpp-2m | cfg:2\nddim | none")
    assert len(items) == 2 and "dpmpp-2m | cfg:scale=2.0: NFE 6" in items[0][1] and "NFE 3" in items[1][1]
    assert "<table>" in status
    with pytest.raises(gr.Error, match="at least two"):
        demo_mod.run_compare("digits", "", "1", 3, 0, 2, "dpmpp-2m | cfg:2")


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


def test_digits_requests_run_concurrently():
    """The digits model takes no shared lock: a request completes while another thread holds the
    lock that diffusers pipelines take turns on (before: it waited for it)."""
    import threading

    from fewstep.apps import generate as gen_mod
    from fewstep.apps.loading import load_model

    model = load_model("digits", "cpu")
    held, release = threading.Event(), threading.Event()

    def hold():
        with gen_mod._GENERATE_LOCK:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    done = []
    worker = threading.Thread(target=lambda: done.append(gen_mod.generate(model, "dpmpp-2m", 2, "cfg:2", n=1)))
    worker.start()
    worker.join(15)
    finished_while_held = bool(done)
    release.set()
    t.join()
    worker.join()
    assert finished_while_held, "a digits request waited for another request's lock"
    assert done[0].nfe == 4


def test_concurrency_setting():
    app = demo_mod.build_demo(concurrency=3)
    limits = {fn.api_name: fn.concurrency_limit for fn in app.fns.values() if fn.api_name in ("generate", "compare")}
    assert limits == {"generate": "default", "compare": "default"}  # = the queue's limit
    assert app._queue.default_concurrency_limit == 3  # the queue shows waiting users their position
    assert demo_mod.build_demo()._queue.default_concurrency_limit == demo_mod.DEFAULT_CONCURRENCY == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="concurrency must be an integer >= 1"):
            demo_mod.build_demo(concurrency=bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts the app on localhost
def test_api_client_sees_errors_as_errors():
    """Through gradio_client (as an API user calls the demo): a good request returns images and the
    NFE line, a bad one raises with the message (before: a successful response with an HTML error)."""
    client_mod = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
    from gradio_client.exceptions import AppError

    app = demo_mod.build_demo(preload=True)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    try:
        client = client_mod.Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, status = client.predict("digits", "", "3,7", "dpmpp-2m", 3, "cfg", "scale=2.0", "", 0, 2,
                                         api_name="/generate")
        assert len(gallery) == 2 and "NFE 6" in status
        with pytest.raises(AppError, match="no such folder"):
            client.predict("/no/such/model", "", "0-9", "dpmpp-2m", 3, "cfg", "scale=2", "", 0, 2,
                           api_name="/generate")
        with pytest.raises(AppError, match="at least two"):
            client.predict("digits", "", "1", 3, 0, 2, "dpmpp-2m | cfg:2", api_name="/compare")
    finally:
        app.close()


@pytest.mark.slow  # starts the app on localhost
def test_two_requests_run_at_once(monkeypatch):
    """With the default concurrency (2) two API requests are inside the handler at the same time:
    each waits for the other at a barrier (with one at a time, the barrier times out)."""
    import threading

    client_mod = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
    barrier = threading.Barrier(2, timeout=15)
    real = demo_mod.generate

    def meet_then_generate(*args, **kwargs):
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_mod, "generate", meet_then_generate)
    app = demo_mod.build_demo(preload=True)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    try:
        client = client_mod.Client(f"http://127.0.0.1:{port}/", verbose=False)
        jobs = [client.submit("digits", "", str(d), "dpmpp-2m", 2, "cfg", "scale=2", "", 0, 1, api_name="/generate")
                for d in (1, 2)]
        results = [job.result(timeout=30) for job in jobs]
        assert all("NFE 4" in status for _, status in results)
    finally:
        app.close()


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
            # a visible error (gr.Error's toast) for an unknown model path
            box = page.locator("#model").locator("textarea, input").first
            box.fill("/no/such/model")
            page.locator("#generate").click()
            page.get_by_text("no such folder").first.wait_for()
            browser.close()
    finally:
        app.close()
    assert shot.exists() and shot.stat().st_size > 1000
