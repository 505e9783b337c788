"""The Gradio demo: few-step sampling with any scheduler and guidance method, side by side.

``build_demo()`` returns the ``gradio.Blocks`` app without launching it (``fewstep demo`` launches
it; tests drive it in a headless browser). It opens on the bundled digits teacher, so nothing is
downloaded. Two tabs:

* **Generate**: model, prompt (text models) or class labels, scheduler, steps, guidance method
  and its parameters, seed, batch size -> images, NFE per image and wall time.
* **Compare**: the same model, seed and labels with two to four ``scheduler | guidance`` lines,
  one image grid per line, side by side.

Every request builds its own scheduler and guidance objects (no state shared between users
except the read-only loaded model weights). Requests go through Gradio's queue, which shows each
waiting user their position; ``concurrency`` of them run at once (``fewstep demo --concurrency N``,
default 2). The digits teacher runs them truly in parallel; diffusers pipelines, whose scheduler
and guidance hook are swapped per request, still take turns (a lock in
:mod:`fewstep.apps.generate`). Bad inputs (steps out of range, unknown model path, bad guidance
parameters ...) raise ``gradio.Error``: a visible error in the page and a failed call for API
clients (``gradio_client`` raises). The handlers :func:`run_generate` and :func:`run_compare` are
plain functions.
"""

from __future__ import annotations

import html
import re
from typing import Any

from ..guidance.spec import GUIDANCE_METHODS, guidance_parameters, parse_guidance
from ..samplers.registry import get_entry, registry
from .generate import generate
from .images import make_grid
from .loading import load_model
from .options import DIGITS

DEMO_MAX_STEPS = 50
DEMO_MAX_BATCH = 16
DEMO_MAX_COMPARE = 4
DEFAULT_CONCURRENCY = 2
DEFAULT_COMPARE = "dpmpp-2m | cfg:2.0\nddim | cfg:2.0\ndpmpp-2m | apg:scale=3,eta=0"
# a scheduler override that gives good digits with dpmpp-2m and dpmpp-3m (FD-digits 12.7 and 8.3 at 8 steps,
# cfg 2; the full logSNR grid alone gives 81 with dpmpp-3m on this cosine-schedule model:
# benchmarks/results/cli_examples.json)
OVERRIDE_EXAMPLE = "timestep_spacing=logsnr, lambda_min_clipped=-5.1"

# demo-wide settings fixed at build time (not per user)
_SETTINGS: dict[str, Any] = {"device": "auto", "dtype": "auto", "allow_download": False}


def _error(err: Exception):
    """``gradio.Error`` for a bad request: shown in the page, and a failure for API clients."""
    import gradio as gr

    msg = re.sub(r"(?<![\w-])--(?=[a-z])", "", str(err))  # CLI option names read as plain words here
    return gr.Error(msg, title="fewstep: bad request")


def _guidance_text(method: str, params: str | None) -> str:
    method = (method or "none").strip()
    params = (params or "").strip()
    if method == "none" or not params:
        return method
    return f"{method}:{params}"


def _check_int(name: str, value, low: int, high: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}") from None
    if not f.is_integer() or not low <= f <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(f)


def _inputs(model_spec, prompt, labels):
    model = load_model(model_spec or DIGITS, _SETTINGS["device"], _SETTINGS["dtype"],
                              allow_download=_SETTINGS["allow_download"])
    if model.kind == "text":
        return model, {"prompt": prompt}
    if model.kind in ("digits", "class"):
        return model, {"labels": labels or None}
    return model, {}


def run_generate(model_spec: str, prompt: str, labels: str, scheduler: str, steps, guidance_method: str,
                 guidance_params: str, scheduler_config: str, seed, batch_size):
    """Generate tab handler -> ``(gallery items, status html)``; ``gradio.Error`` on bad input."""
    try:
        steps = _check_int("steps", steps, 1, DEMO_MAX_STEPS)
        batch = _check_int("batch size", batch_size, 1, DEMO_MAX_BATCH)
        seed = _check_int("seed", seed, 0, 2**31 - 1)
        get_entry(scheduler)
        gspec = parse_guidance(_guidance_text(guidance_method, guidance_params))
        model, cond = _inputs(model_spec, prompt, labels)
        res = generate(model, scheduler, steps, gspec, seed=seed, n=batch, scheduler_config=scheduler_config,
                              max_steps=DEMO_MAX_STEPS, **cond)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as err:
        raise _error(err) from err
    items = [(img, cap) for img, cap in zip(res.images, res.captions)]
    status = (f"<b>{len(res.images)} images</b> &middot; {html.escape(res.settings['scheduler'])}, {steps} steps, "
              f"guidance {html.escape(res.settings['guidance'])} &middot; <b>NFE {res.nfe}</b> per image "
              f"&middot; {res.wall_time:.2f} s")
    return items, f'<div class="fewstep-ok">{status}</div>'


def parse_compare(text: str) -> list[tuple[str, str]]:
    """``scheduler | guidance`` lines (blank lines and ``#`` comments ignored) -> list of pairs."""
    out = []
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        sched, _, guid = line.partition("|")
        out.append((sched.strip(), guid.strip() or "none"))
    if len(out) < 2:
        raise ValueError("compare needs at least two 'scheduler | guidance' lines")
    if len(out) > DEMO_MAX_COMPARE:
        raise ValueError(f"compare takes at most {DEMO_MAX_COMPARE} lines, got {len(out)}")
    for sched, guid in out:
        get_entry(sched)
        parse_guidance(guid)
    return out


def run_compare(model_spec: str, prompt: str, labels: str, steps, seed, batch_size, settings_text: str):
    """Compare tab handler: one grid per ``scheduler | guidance`` line, same seed and labels;
    ``gradio.Error`` on bad input."""
    try:
        steps = _check_int("steps", steps, 1, DEMO_MAX_STEPS)
        batch = _check_int("batch size", batch_size, 1, DEMO_MAX_BATCH)
        seed = _check_int("seed", seed, 0, 2**31 - 1)
        pairs = parse_compare(settings_text)
        model, cond = _inputs(model_spec, prompt, labels)
        items, rows = [], []
        for sched, guid in pairs:
            res = generate(model, sched, steps, guid, seed=seed, n=batch, max_steps=DEMO_MAX_STEPS, **cond)
            cap = f"{sched} | {res.settings['guidance']}: NFE {res.nfe}, {res.wall_time:.2f} s"
            items.append((make_grid(res.images), cap))
            rows.append(f"<tr><td>{html.escape(sched)}</td><td>{html.escape(res.settings['guidance'])}</td>"
                        f"<td>{res.nfe}</td><td>{res.wall_time:.2f}</td></tr>")
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as err:
        raise _error(err) from err
    table = ("<table><tr><th>scheduler</th><th>guidance</th><th>NFE</th><th>time (s)</th></tr>"
             + "".join(rows) + "</table>")
    return items, f'<div class="fewstep-ok">seed {seed}, {steps} steps{table}</div>'


def _guidance_hint(method: str) -> str:
    params = guidance_parameters(method) if method != "none" else {}
    if not params:
        return "no parameters"
    return "key=value, comma-separated; parameters: " + ", ".join(params)


def build_demo(model: str = DIGITS, device: str = "auto", dtype: str = "auto", allow_download: bool = False,
               preload: bool = False, concurrency: int = DEFAULT_CONCURRENCY):
    """The demo as a ``gradio.Blocks`` (not launched). ``model`` prefills the model box;
    ``allow_download`` lets hub ids be fetched; ``preload`` loads the default model now;
    ``concurrency``: requests that run at once (the rest wait in the queue, shown their position)."""
    import gradio as gr

    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    _SETTINGS.update(device=device, dtype=dtype, allow_download=bool(allow_download))
    if preload:
        load_model(model, device, dtype, allow_download=allow_download)
    sched_names = list(registry())
    gnames = list(GUIDANCE_METHODS)
    default_sched = "dpmpp-2m" if "dpmpp-2m" in sched_names else sched_names[0]

    with gr.Blocks(title="fewstep demo", analytics_enabled=False) as demo:
        gr.Markdown("# fewstep: few-step diffusion sampling\n"
                    "The bundled 8x8 digits teacher runs offline; any local diffusers pipeline folder "
                    "(or a cached hub id) works too. NFE = model evaluations per image.")
        with gr.Row():
            model_box = gr.Textbox(value=model, label="model ('digits', a local diffusers folder or a hub id)",
                                   elem_id="model", scale=3)
            labels_box = gr.Textbox(value="0-9", label="class labels (class models), e.g. 0-9 or 3,7",
                                    elem_id="labels", scale=2)
            prompt_box = gr.Textbox(value="", label="prompt (text-to-image models)", elem_id="prompt", scale=3)
        with gr.Row():
            seed_box = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            steps_box = gr.Slider(1, DEMO_MAX_STEPS, value=8, step=1, label="steps", elem_id="steps")
            batch_box = gr.Slider(1, DEMO_MAX_BATCH, value=8, step=1, label="batch size", elem_id="batch")
        with gr.Tab("Generate"):
            with gr.Row():
                sched_box = gr.Dropdown(sched_names, value=default_sched, label="scheduler", elem_id="scheduler")
                guid_box = gr.Dropdown(gnames, value="cfg", label="guidance",
                                       elem_id="guidance")
                gparams_box = gr.Textbox(value=GUIDANCE_METHODS["cfg"].example, label="guidance parameters",
                                         info=_guidance_hint("cfg"), elem_id="guidance-params")
                sconf_box = gr.Textbox(value="", label="scheduler config overrides (key=value, ...)",
                                       placeholder=OVERRIDE_EXAMPLE, elem_id="scheduler-config")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            status = gr.HTML(elem_id="status")
            gallery = gr.Gallery(label="images", columns=8, height="auto", elem_id="gallery")
        with gr.Tab("Compare"):
            cmp_box = gr.Textbox(value=DEFAULT_COMPARE, lines=4, label=f"settings, one 'scheduler | guidance' per "
                                 f"line (2..{DEMO_MAX_COMPARE})", elem_id="compare-settings")
            cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare")
            cmp_status = gr.HTML(elem_id="compare-status")
            cmp_gallery = gr.Gallery(label="side by side", columns=DEMO_MAX_COMPARE, height="auto",
                                     elem_id="compare-gallery")
        with gr.Accordion("Schedulers", open=False):
            gr.Markdown("\n".join(f"- **{e.name}** ({e.source}): {e.description}" for e in registry().values()))

        def _on_guidance(method):
            entry = GUIDANCE_METHODS.get(method)
            return gr.update(value=entry.example if entry else "", info=_guidance_hint(method))

        guid_box.change(_on_guidance, guid_box, gparams_box, queue=False)
        gen_btn.click(run_generate, [model_box, prompt_box, labels_box, sched_box, steps_box, guid_box, gparams_box,
                                     sconf_box, seed_box, batch_box], [gallery, status], api_name="generate")
        cmp_btn.click(run_compare, [model_box, prompt_box, labels_box, steps_box, seed_box, batch_box, cmp_box],
                      [cmp_gallery, cmp_status], api_name="compare")
    demo.queue(default_concurrency_limit=concurrency, max_size=32)
    return demo
