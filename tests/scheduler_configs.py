"""``scheduler/scheduler_config.json`` contents that real pipelines ship, as test fixtures.

Each entry is the file's JSON text (parsed with ``json.loads``, so ``-Infinity`` reads as diffusers
writes it) and says where the text was taken from. Where no copy of the Hugging Face file itself
was found, the source is a public repository that vendors the file verbatim (ai-toolkit keeps the
configs of the models it trains as Python dicts; ``True``/``None`` became ``true``/``null`` here).
"""

from __future__ import annotations

import json

SHIPPED_CONFIGS = {
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5), PNDMScheduler. Source: GitHub mirror
    # HDRJ-One/runwayml-stable-diffusion-v1-5 @ 2e7465d9dffe7e53e88aea896882476ea872ca95,
    # scheduler/scheduler_config.json.
    "sd15": """{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.17.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "clip_sample_range": 1.0,
  "dynamic_thresholding_ratio": 0.995,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "thresholding": false,
  "trained_betas": null
}""",
    # SDXL (stabilityai/stable-diffusion-xl-base-1.0's EulerDiscreteScheduler, "leading" spacing).
    # Source: PRITHIVSAKTHIUR/AI-Art-Generator-SDXL @ a04712fe9b65454f2e625e522f1d0b43e2ff76bc,
    # scheduler/scheduler_config.json (an SDXL pipeline folder; Danielfegapeter/Hotshot-XL @ b9e21879
    # ships the same keys and values with _diffusers_version 0.18.1).
    "sdxl": """{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.22.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}""",
    # SDXL fine-tunes that ship Euler Ancestral. Source: DeveloperRadleighPompei/sdxl
    # @ 51e1b905f0d644efa6685a6912a45c72962be30b, scheduler/scheduler_config.json.
    "sdxl_euler_a": """{
  "_class_name": "EulerAncestralDiscreteScheduler",
  "_diffusers_version": "0.24.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "linspace",
  "trained_betas": null
}""",
    # SD3-class flow matching (static shift 3.0). Source: ostris/ai-toolkit
    # @ 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350, toolkit/sampler.py, ``sd_flow_config`` (the config
    # ai-toolkit samples SD3-architecture models with). No verbatim copy of
    # stabilityai/stable-diffusion-3-medium-diffusers' file (shift 3.0 as well) was found.
    "sd3": """{
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.30.0.dev0",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 3.0,
  "use_dynamic_shifting": false
}""",
    # FLUX.1-dev (resolution-dependent shift: the pipeline passes ``mu``). Source: ostris/ai-toolkit
    # @ 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350, toolkit/sampler.py, ``flux_config``.
    "flux_dev": """{
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.30.0.dev0",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 3.0,
  "use_dynamic_shifting": true
}""",
    # FLUX.1-schnell (shift 1.0, no dynamic shifting). Source: edkamesh/FluX-optimized
    # @ 2557da90a2147f9d653d27d67d19f683d7f180b3, scheduler/scheduler_config.json.
    "flux_schnell": """{
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.31.0.dev0",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 1.0,
  "use_dynamic_shifting": false
}""",
    # Wan 2.1 (Wan-AI/Wan2.1-T2V-*-Diffusers): UniPC, bh2, flow sigmas, flow_shift 3.0. Source:
    # ostris/ai-toolkit @ 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350, toolkit/models/wan21/wan21.py,
    # ``scheduler_configUniPC``. The values are those diffusers' scripts/convert_wan_to_diffusers.py
    # writes (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    # num_train_timesteps=1000, flow_shift=3.0)).
    "wan21": """{
  "_class_name": "UniPCMultistepScheduler",
  "_diffusers_version": "0.33.0.dev0",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "disable_corrector": [],
  "dynamic_thresholding_ratio": 0.995,
  "final_sigmas_type": "zero",
  "flow_shift": 3.0,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "predict_x0": true,
  "prediction_type": "flow_prediction",
  "rescale_betas_zero_snr": false,
  "sample_max_value": 1.0,
  "solver_order": 2,
  "solver_p": null,
  "solver_type": "bh2",
  "steps_offset": 0,
  "thresholding": false,
  "timestep_spacing": "linspace",
  "trained_betas": null,
  "use_beta_sigmas": false,
  "use_exponential_sigmas": false,
  "use_flow_sigmas": true,
  "use_karras_sigmas": false
}""",
    # Wan 2.2 A14B (Wan-AI/Wan2.2-T2V-A14B-Diffusers, flow_shift 3.0). Source: ostris/ai-toolkit
    # @ 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350,
    # extensions_built_in/diffusion_models/wan22/wan22_14b_model.py, ``scheduler_configUniPC``.
    "wan22_a14b": """{
  "_class_name": "UniPCMultistepScheduler",
  "_diffusers_version": "0.35.0.dev0",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "disable_corrector": [],
  "dynamic_thresholding_ratio": 0.995,
  "final_sigmas_type": "zero",
  "flow_shift": 3.0,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "predict_x0": true,
  "prediction_type": "flow_prediction",
  "rescale_betas_zero_snr": false,
  "sample_max_value": 1.0,
  "solver_order": 2,
  "solver_p": null,
  "solver_type": "bh2",
  "steps_offset": 0,
  "thresholding": false,
  "time_shift_type": "exponential",
  "timestep_spacing": "linspace",
  "trained_betas": null,
  "use_beta_sigmas": false,
  "use_dynamic_shifting": false,
  "use_exponential_sigmas": false,
  "use_flow_sigmas": true,
  "use_karras_sigmas": false
}""",
    # Wan 2.2 TI2V 5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers, flow_shift 5.0). Source: ostris/ai-toolkit
    # @ 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350,
    # extensions_built_in/diffusion_models/wan22/wan22_5b_model.py, ``scheduler_configUniPC``.
    "wan22_ti2v_5b": """{
  "_class_name": "UniPCMultistepScheduler",
  "_diffusers_version": "0.35.0.dev0",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "disable_corrector": [],
  "dynamic_thresholding_ratio": 0.995,
  "final_sigmas_type": "zero",
  "flow_shift": 5.0,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "predict_x0": true,
  "prediction_type": "flow_prediction",
  "rescale_betas_zero_snr": false,
  "sample_max_value": 1.0,
  "solver_order": 2,
  "solver_p": null,
  "solver_type": "bh2",
  "steps_offset": 0,
  "thresholding": false,
  "time_shift_type": "exponential",
  "timestep_spacing": "linspace",
  "trained_betas": null,
  "use_beta_sigmas": false,
  "use_dynamic_shifting": false,
  "use_exponential_sigmas": false,
  "use_flow_sigmas": true,
  "use_karras_sigmas": false
}""",
    # PixArt-alpha (PixArt-alpha/PixArt-XL-2-1024-MS): DPMSolverMultistepScheduler. Source:
    # ostris/ai-toolkit @ 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350, toolkit/sampler.py, ``pixart_config``
    # (its "lambda_min_clipped": -Infinity restored from the comment next to it).
    "pixart": """{
  "_class_name": "DPMSolverMultistepScheduler",
  "_diffusers_version": "0.22.0.dev0",
  "algorithm_type": "dpmsolver++",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "dynamic_thresholding_ratio": 0.995,
  "euler_at_final": false,
  "lambda_min_clipped": -Infinity,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "solver_order": 2,
  "solver_type": "midpoint",
  "steps_offset": 0,
  "thresholding": false,
  "timestep_spacing": "linspace",
  "trained_betas": null,
  "use_karras_sigmas": false,
  "use_lu_lambdas": false,
  "variance_type": null
}""",
}


def shipped_config(name: str) -> dict:
    """A fresh dict of the named shipped config."""
    return json.loads(SHIPPED_CONFIGS[name])
