"""``fewstep sample``: files written, record contents, seeding, parsing and error messages."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.apps import loading
from fewstep.apps.cli import main
from fewstep.apps.generate import generate
from fewstep.apps.options import parse_labels
from fewstep.guidance.spec import guidance_names, parse_guidance
from fewstep.samplers.registry import describe, make_scheduler, parse_overrides, registry, scheduler_names

REQUIRED_NAMES = ["ddim", "euler", "dpmpp-1m", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-karras", "dpmpp-3m-karras",
                  "dpmpp-2s", "dpmpp-3s", "dpmpp-2m-sde", "dpmpp-3m-sde", "unipc", "deis", "dpmpp-2m-diffusers"]

DIGITS_CONFIG = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
    "timestep_spacing": "trailing", "_class_name": "DDPMScheduler",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arr(path):
    return np.asarray(Image.open(path), dtype=np.int16)


# ---------------------------------------------------------------------------------- registry
def test_registry_names_build_and_keep_the_config():
    names = scheduler_names()
    assert names[: len(REQUIRED_NAMES)] == REQUIRED_NAMES
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dpm-v3 without EMS falls back, with a warning
            s = make_scheduler(name, DIGITS_CONFIG)
        assert s.config.prediction_type == "v_prediction", name
        assert s.config.beta_schedule == "squaredcos_cap_v2", name
        s.set_timesteps(6)
        assert len(s.timesteps) >= 6 or name in ("dpmpp-2s", "dpmpp-3s"), name
    e = registry()
    assert e["dpmpp-3m-karras"].build(DIGITS_CONFIG).config.use_karras_sigmas is True
    assert e["dpmpp-2s"].build(DIGITS_CONFIG).config.method == "singlestep"
    assert e["dpmpp-2m-sde"].build(DIGITS_CONFIG).config.algorithm_type == "sde-dpmsolver++"
    assert type(e["dpmpp-2m-diffusers"].build(DIGITS_CONFIG)).__name__ == "DPMSolverMultistepScheduler"
    table = describe()
    assert all(n in table for n in names)


def test_overrides_are_parsed_and_checked():
    ov = parse_overrides(["timestep_spacing=logsnr", "lower_order_final=false", "karras_rho=5",
                          "lambda_min_clipped=-inf"])
    assert ov == {"timestep_spacing": "logsnr", "lower_order_final": False, "karras_rho": 5,
                  "lambda_min_clipped": -float("inf")}
    s = make_scheduler("dpmpp-3m", DIGITS_CONFIG, ov)
    assert s.config.timestep_spacing == "logsnr" and s.config.lower_order_final is False
    with pytest.raises(ValueError, match="not accepted.*allowed"):
        make_scheduler("dpmpp-2m", DIGITS_CONFIG, {"not_a_key": 1})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ValueError, match="unknown; allowed: ddim"):
        make_scheduler("dpmpp-9m", DIGITS_CONFIG)


# ---------------------------------------------------------------------------------- parsing
def test_guidance_and_label_parsing():
    g = parse_guidance("cfg:2.5")
    assert (g.method, g.params, g.is_plain, g.scale) == ("cfg", {"scale": 2.5}, True, 2.5)
    assert parse_guidance(None).method == "none"
    assert parse_guidance("none").scale == 1.0
    names = guidance_names()
    if "apg" in names:
        g = parse_guidance("apg:scale=5,eta=0")
        assert g.params == {"scale": 5.0, "eta": 0.0} and type(g.build()).__name__ == "APG"
        assert g.build() is not g.build()  # fresh state per generation
    if "cfgpp" in names:
        assert parse_guidance("cfgpp:0.6").params == {"scale": 0.6}
    if "ag" in names:
        assert parse_guidance("ag:scale=2,threshold=0.99").params == {"scale": 2.0, "threshold": 0.99}
    for bad, msg in [("zzz:1", "unknown method 'zzz'"), ("cfg:abc", "finite number"), ("cfg:-1", ">= 0"),
                     ("cfg:scale=2,foo=1", "'foo' is not accepted"), ("cfg:2,3", "key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_guidance(bad)
    assert parse_labels("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("10", "a-b", "5-2", ""):
        with pytest.raises(ValueError, match="labels"):
            parse_labels(bad)


def test_device_dtype_resolution():
    assert loading.resolve_device("cpu").type == "cpu"
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--device 'tpu'"):
        loading.resolve_device("tpu")
    with pytest.raises(ValueError, match="--dtype"):
        loading.resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            loading.resolve_device("cuda")
        assert loading.resolve_device("auto").type in ("cpu", "mps")
    # the library spelling of the same function (evaluation, EMS) names its keyword argument
    from fewstep.eval.features import resolve_device

    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="^device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(TypeError, match="device must be a str"):
        resolve_device(3)


# ---------------------------------------------------------------------------------- the command
def test_eval_reads_a_sample_folder_through_its_record(tmp_path, capsys):
    """``fewstep eval fd-digits OUT`` on ``fewstep sample``'s output uses exactly the listed images
    (not grid.png, not record.json) and their intended labels from the record; the numbers equal
    the Python API on the same images and labels."""
    from fewstep.eval.fd_digits import fd_digits

    out = tmp_path / "run"
    argv = ["sample", "--model", "digits", "--scheduler", "ddim", "--steps", "3", "--guidance", "cfg:2.0",
            "--labels", "3,7,1", "--n", "6", "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="only 6 generated images"):  # small-N bias is announced
        assert main(["eval", "fd-digits", str(out), "--json", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["gen"]["n"] == 6 and "fewstep sample record" in got["gen"]["source"]
    rec = json.loads((out / "record.json").read_text())
    imgs = [torch.from_numpy(np.array(Image.open(out / n).convert("RGB"))).permute(2, 0, 1)
            for n in sorted(rec["images"])]
    labels = dict(zip(rec["images"], rec["settings"]["labels"]))
    with pytest.warns(UserWarning, match="only 6 generated images"):
        want = fd_digits(torch.stack(imgs), torch.tensor([labels[n] for n in sorted(rec["images"])]))
    assert got["value"] == pytest.approx(want["fd"], rel=1e-6) and got["accuracy"] == want["accuracy"]
    assert got["accuracy"] is not None
    # an image the record lists but the folder lacks is an error, not a silently smaller sample
    (out / rec["images"][2]).unlink()
    assert main(["eval", "fd-digits", str(out), "--json", "--no-progress"]) != 0
    assert "lists 1 image(s) that are missing" in capsys.readouterr().err


def test_sample_writes_pngs_grid_and_record(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sample", "--model", "digits", "--scheduler", "dpmpp-2m", "--steps", "3", "--guidance", "cfg:2.0",
            "--labels", "3,7", "--n", "4", "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    rec = json.loads((out / "record.json").read_text())
    s = rec["settings"]
    assert (s["model"], s["scheduler"], s["steps"], s["guidance"], s["seed"], s["n"]) == \
        ("digits", "dpmpp-2m", 3, "cfg:scale=2.0", 0, 4)
    assert s["labels"] == [3, 7, 3, 7] and s["scheduler_class"] == "DPMSolverPPScheduler"
    assert rec["nfe"] == 6  # 3 steps x (cond + uncond)
    assert rec["wall_time_s"] > 0 and rec["images"][0] == "000000.png"
    img = Image.open(out / "000000.png")
    assert img.size == (64, 64) and s["upscale"] == 8  # 8x8 digits, nearest-upscaled for viewing
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    a0 = _arr(out / "000000.png")
    assert a0.std() > 10  # an actual image, not a blank

    # same seed -> same first image with a different batch split; --guidance none uses NFE = steps
    out2 = tmp_path / "run2"
    argv2 = [a if a != "cfg:2.0" else "none" for a in argv]
    argv2[argv2.index(str(out))] = str(out2)
    assert main(argv2 + ["--batch-size", "2"]) == 0
    rec2 = json.loads((out2 / "record.json").read_text())
    assert rec2["nfe"] == 3 and rec2["settings"]["batch_size"] == 2
    assert np.abs(_arr(out2 / "000000.png") - a0).max() > 0  # unguided differs from guided


def test_sample_list_and_errors(tmp_path, capsys):
    assert main(["sample", "--list-schedulers"]) == 0
    listing = capsys.readouterr().out
    assert "dpmpp-2m-karras" in listing and "DPMSolverMultistepScheduler" in listing
    cases = [
        (["--scheduler", "nope"], "scheduler 'nope' is unknown"),
        (["--steps", "0"], "steps must be in 1..1000"),
        (["--guidance", "cfg:x"], "finite number"),
        (["--scheduler-config", "bogus=1"], "bogus"),
        (["--model", str(tmp_path / "missing")], "no such folder"),
        (["--model", str(tmp_path)], "no model_index.json"),
        (["--model", "someone/not-cached"], "--allow-download"),
        (["--labels", "12"], "labels"),
        (["--prompt", "a cat"], "class-conditional"),
    ]
    for extra, msg in cases:
        rc = main(["sample", "--steps", "1", "--n", "1", "--no-progress", "--out", str(tmp_path / "e")] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (extra, err)
    assert not (tmp_path / "e").exists()


def test_guidance_objects_and_sde_are_seeded():
    """A guidance object (fewstep.sample path) equals the pipeline's CFG at the same seed; the SDE
    solver is reproducible through the seed."""
    model = loading.load_model("digits", "cpu")
    plain = generate(model, "dpmpp-2m", 3, "cfg:2.0", seed=1, n=2, labels="4", upscale=1)
    if "apg" in guidance_names():
        # APG with eta=1, no threshold, no momentum is exactly CFG (paper Algorithm 1)
        apg = generate(model, "dpmpp-2m", 3, "apg:scale=2,eta=1", seed=1, n=2, labels="4", upscale=1)
        assert apg.nfe == plain.nfe == 6
        for a, b in zip(apg.images, plain.images):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    sde = [generate(model, "dpmpp-2m-sde", 3, "cfg:2.0", seed=s, n=1, labels="4", upscale=1).images[0]
           for s in (5, 5, 6)]
    assert np.array_equal(np.asarray(sde[0]), np.asarray(sde[1]))
    assert not np.array_equal(np.asarray(sde[0]), np.asarray(sde[2]))


def test_sample_local_diffusers_folder_with_prompt(tmp_path):
    """A saved (tiny, random) Stable Diffusion folder: --model FOLDER --prompt, CFG and a guidance
    object through fewstep.guidance.attach, NFE counted from the denoiser calls."""
    from tiny_pipelines import tiny_sd

    folder = tmp_path / "tiny-sd"
    tiny_sd().save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["sample", "--model", str(folder), "--prompt", "a digit", "--scheduler", "dpmpp-2m", "--steps", "2",
            "--n", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv + ["--guidance", "cfg:3"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["settings"]["kind"] == "text" and rec["settings"]["prompt"] == "a digit"
    assert rec["nfe"] == 4 and rec["settings"]["upscale"] == 2  # 32 px images shown at 64 px
    assert Image.open(out / "000001.png").size == (64, 64)
    if "apg" in guidance_names():
        assert main(argv + ["--guidance", "apg:scale=3,eta=1", "--out", str(tmp_path / "apg")]) == 0
        rec2 = json.loads((tmp_path / "apg" / "record.json").read_text())
        assert rec2["nfe"] == 4 and rec2["settings"]["guidance"] == "apg:scale=3.0,eta=1.0"
    no_prompt = ["sample", "--model", str(folder), "--steps", "1", "--n", "1", "--out", str(tmp_path / "x")]
    assert main(no_prompt) == 2  # a text model without a prompt: clear error


def test_dpm_v3_on_digits_uses_the_ems_of_its_guidance_scale():
    """The shipped EMS are statistics of the guided model: unguided runs get `digits`, CFG 2 `digits-cfg2`."""
    from fewstep.apps.loading import digits_ems_for

    assert digits_ems_for(parse_guidance("none")) == {"ems": "digits"}
    assert digits_ems_for(parse_guidance("cfg:1.0")) == {"ems": "digits"}
    assert digits_ems_for(parse_guidance("cfg:2.0")) == {"ems": "digits-cfg2"}
    assert digits_ems_for(parse_guidance("apg:scale=5,eta=0")) == {"ems": "digits-cfg2"}
