"""Teachers and training data for distillation: the bundled digits teacher and any local diffusers
pipeline folder with a ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL class).

A *source* gives a method everything model-specific, so that a method never looks at the model
type:

* ``schedule`` (:class:`fewstep.schedule.NoiseSchedule`), ``scheduler_config``, ``prediction_type``,
  ``sample_shape`` (the shape of one training sample: pixels for digits, latents for SD);
* ``teacher`` (frozen, eval mode) and :meth:`call` (``call(model, x, t, cond, timestep_cond=None)
  -> raw output``) for the teacher and every student built from it;
* :meth:`build_student` -- ``"copy"`` (a trainable copy of the teacher), ``"guidance"`` (the teacher
  plus LCM's guidance-scale input, zero-initialised), ``"lora"`` (the teacher with peft LoRA
  adapters; only the adapters train);
* :meth:`load_batch` -- training data (``x0``: pixels or VAE latents) and conditions for a list
  of data indices; conditions are dicts of batch-first tensors (:func:`cat_cond`,
  :func:`index_cond`), :meth:`null_cond` the unconditional branch of classifier-free guidance;
* :meth:`export` -- the trained student in a loadable format.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: LoRA target modules of diffusers' LCM-LoRA script (train_lcm_distill_lora_sd_wds.py)
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def cat_cond(a: dict, b: dict) -> dict:
    """Concatenate two condition dicts along the batch dimension."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def index_cond(c: dict, idx) -> dict:
    """Rows ``idx`` of every tensor of a condition dict."""
    return {k: v[idx] for k, v in c.items()}


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _trainable(model: torch.nn.Module) -> torch.nn.Module:
    return model.train().requires_grad_(True)


def lora_config(rank: int, alpha: float, targets, dropout: float = 0.0):
    """A ``peft.LoraConfig`` (Hu et al. 2021) on the modules named by ``targets`` (suffixes)."""
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      target_modules=list(targets), init_lora_weights="gaussian")


def _present_targets(model: torch.nn.Module, targets) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    found = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in {type(model).__name__}")
    return found


class Source:
    """Base class; see the module docstring."""

    name = "source"
    schedule = None
    scheduler_config: dict = {}
    prediction_type = "epsilon"
    sample_shape: tuple = ()
    teacher: torch.nn.Module

    def num_data(self) -> int:
        raise NotImplementedError

    def load_batch(self, indices: torch.Tensor, with_data: bool = True) -> dict:
        raise NotImplementedError

    def null_cond(self, n: int) -> dict:
        raise NotImplementedError

    def call(self, model, x, t, cond: dict, timestep_cond=None) -> torch.Tensor:
        raise NotImplementedError

    def build_student(self, kind: str, time_cond_proj_dim: int = 64, lora: dict | None = None) -> torch.nn.Module:
        """A trainable student initialised from the (fp32) teacher: ``"copy"``, ``"guidance"`` (plus a
        zero-initialised guidance-scale input of ``time_cond_proj_dim``) or ``"lora"`` (``lora``: rank,
        alpha, targets, dropout; only the adapters train)."""
        base = self._fp32_teacher
        if kind == "copy":
            return _trainable(copy.deepcopy(base))
        if kind == "guidance":
            return _trainable(self._guidance_student(base, int(time_cond_proj_dim)))
        if kind == "lora":
            return self._lora(copy.deepcopy(base), lora)
        raise ValueError(f"student kind {kind!r} is not supported; allowed: 'copy', 'guidance', 'lora'")

    def _guidance_student(self, base: torch.nn.Module, dim: int) -> torch.nn.Module:
        raise NotImplementedError

    def export(self, name: str, model: torch.nn.Module, out_dir: Path, scheduler_config: dict, info: dict) -> Path:
        raise NotImplementedError

    def _lora(self, model: torch.nn.Module, lora: dict) -> torch.nn.Module:
        """Add LoRA adapters to ``model`` (frozen base): diffusers' ``add_adapter`` when the model has
        it (``UNet2DConditionModel``), else ``peft.inject_adapter_in_model``."""
        from peft import inject_adapter_in_model

        model.requires_grad_(False)
        cfg = lora_config(lora["rank"], lora["alpha"], _present_targets(model, lora["targets"]), lora["dropout"])
        if hasattr(model, "add_adapter"):
            model.add_adapter(cfg)
        else:
            inject_adapter_in_model(cfg, model)
            model.peft_config = {"default": cfg}
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        return model.train()


# ------------------------------------------------------------------------------------------------
# the bundled digits teacher
# ------------------------------------------------------------------------------------------------
class DigitsSource(Source):
    """The bundled class-conditional digits teacher (v-prediction, cosine 1000-step VP schedule) and
    the digits training split (1437 images, labels); conditions ``{"class_labels": (B,)}``, null
    class 10."""

    name = "digits"

    def __init__(self, device, teacher_dtype: str = "fp32"):
        from fewstep.models.digits import load_digits_split
        from fewstep.models.pipeline import NULL_CLASS, load_digits_scheduler_config, load_digits_teacher_unet
        from fewstep.schedule import NoiseSchedule

        self.device = torch.device(device)
        self.teacher = load_digits_teacher_unet(self.device)
        self._fp32_teacher = self.teacher
        if teacher_dtype != "fp32":
            self.teacher = copy.deepcopy(self.teacher).to(_dtype(teacher_dtype))
        self.scheduler_config = load_digits_scheduler_config()
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.prediction_type = self.scheduler_config["prediction_type"]
        self.null_class = NULL_CLASS
        self.x, self.y = load_digits_split("train")
        self.sample_shape = tuple(self.x.shape[1:])

    def num_data(self) -> int:
        return len(self.y)

    def load_batch(self, indices: torch.Tensor, with_data: bool = True) -> dict:
        idx = indices.cpu()
        out = {"cond": {"class_labels": self.y[idx].to(self.device)}}
        if with_data:
            out["x0"] = self.x[idx].to(self.device)
        return out

    def null_cond(self, n: int) -> dict:
        return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=self.device)}

    def eval_cond(self, n: int) -> dict:
        """Balanced labels for evaluation: ``0..9`` repeated, ``n`` a multiple of 10."""
        return {"class_labels": torch.arange(10, device=self.device).repeat_interleave(n // 10)}

    def call(self, model, x, t, cond: dict, timestep_cond=None) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).to(torch.float32)
        kwargs = {"class_labels": cond["class_labels"]}
        if timestep_cond is not None:
            kwargs["timestep_cond"] = timestep_cond.to(dtype)
        return model(x.to(dtype), t, **kwargs).sample.to(x.dtype)

    def _guidance_student(self, base, dim: int):
        from fewstep.models.students import GuidanceUNet2DModel

        return GuidanceUNet2DModel.from_teacher(base, dim)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-range samples -> images in [0, 1] (B, 1, 8, 8), as the pipeline outputs them."""
        return (x.float().clamp(-1, 1) + 1) / 2

    def export(self, name: str, model: torch.nn.Module, out_dir: Path, scheduler_config: dict, info: dict) -> Path:
        """Digits students: ``digits_<name>_unet.safetensors`` + ``digits_<name>.json`` (copy into
        ``fewstep/models/weights/`` to ship); LoRA students: the LoRA weights merged into the UNet."""
        from fewstep.models.students import save_digits_student

        if any("lora_" in n for n, _ in model.named_parameters()):
            model = _merge_lora(model)
        save_digits_student(name, model, scheduler_config, out_dir, info.get("guidance_range"), info)
        return Path(out_dir)


def _merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every peft LoRA layer merged into its base layer and removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    if hasattr(merged, "_hf_peft_config_loaded"):
        merged._hf_peft_config_loaded = False
    return merged


# ------------------------------------------------------------------------------------------------
# a local diffusers pipeline folder (SD 1.x / 2.x / SDXL class)
# ------------------------------------------------------------------------------------------------
def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.prompts file {path} does not exist")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"data.prompts file {path} holds no prompts (one per line)")
    return prompts


def _list_images(path: str) -> list[Path]:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"data.images folder {path} does not exist")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"data.images folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class PipelineSource(Source):
    """A local diffusers pipeline folder whose ``unet`` is a ``UNet2DConditionModel`` on a discrete
    VP schedule (SD 1.x/2.x: ``StableDiffusionPipeline``; SDXL: ``StableDiffusionXLPipeline``).

    Data: ``prompts`` (a text file, one prompt per line) and ``images`` (a folder; resized to
    ``resolution`` with a centre crop and encoded with the VAE's posterior mean times
    ``vae.config.scaling_factor``). With both, line ``i`` captions image ``i`` (sorted file names)
    and the counts must match, unless there is a single prompt for all images. Text is encoded per
    batch with the pipeline's own ``encode_prompt``; the unconditional branch is the pipeline's
    negative embedding of the empty prompt (zeros for SDXL's ``force_zeros_for_empty_prompt``).
    Conditions: ``{"encoder_hidden_states"}`` (+ ``"text_embeds"``, ``"time_ids"`` for SDXL).
    """

    name = "pipeline"

    def __init__(self, path: str, device, prompts: str | None = None, images: str | None = None,
                 resolution: int | None = None, teacher_dtype: str = "fp32", needs_data: bool = True):
        from diffusers import DiffusionPipeline, UNet2DConditionModel

        from fewstep.schedule import NoiseSchedule

        self.device = torch.device(device)
        self.path = Path(path)
        if not (self.path / "model_index.json").is_file():
            raise FileNotFoundError(f"model.path {path} is not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(str(self.path), local_files_only=True)
        if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
            raise ValueError(f"model.path {path}: pipeline {type(pipe).__name__} has no UNet2DConditionModel "
                             "(distillation supports SD 1.x/2.x and SDXL-class pipelines)")
        self.pipe = pipe
        self.pipeline_class = type(pipe).__name__
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        self.scheduler_config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        self.schedule = NoiseSchedule.from_config(pipe.scheduler.config)
        if self.schedule.kind != "discrete":
            raise ValueError(f"model.path {path}: only discrete VP schedules are supported, got {self.schedule.kind}")
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        unet = pipe.unet.to(self.device).eval().requires_grad_(False)
        self._fp32_teacher = unet
        self.teacher = unet if teacher_dtype == "fp32" else copy.deepcopy(unet).to(_dtype(teacher_dtype))
        for name in ("vae", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is not None:
                m.to(self.device).eval().requires_grad_(False)
        self.vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or pipe.unet.config.sample_size * self.vae_factor)
        if self.resolution % self.vae_factor:
            raise ValueError(f"data.resolution={self.resolution} must be a multiple of the VAE factor "
                             f"{self.vae_factor}")
        lat = self.resolution // self.vae_factor
        self.sample_shape = (pipe.unet.config.in_channels, lat, lat)
        self.prompts = _read_prompts(prompts) if prompts else None
        self.images = _list_images(images) if images else None
        if needs_data and self.images is None:
            raise ValueError("this method trains on data: set data.images to a folder of training images")
        if self.prompts is None:
            raise ValueError("a text-to-image pipeline needs data.prompts (a text file, one prompt per line)")
        if self.images is not None and len(self.prompts) not in (1, len(self.images)):
            raise ValueError(f"data.prompts has {len(self.prompts)} lines for {len(self.images)} images in "
                             "data.images: give one prompt per image (sorted file names) or a single prompt")
        with torch.no_grad():
            self._null = self._encode([""], negative=True)

    def num_data(self) -> int:
        return len(self.images) if self.images is not None else len(self.prompts)

    def _prompt_of(self, i: int) -> str:
        return self.prompts[0] if len(self.prompts) == 1 else self.prompts[i % len(self.prompts)]

    def _encode(self, prompts: list[str], negative: bool = False) -> dict:
        pipe = self.pipe
        if self.is_sdxl:
            pe, ne, pp, npool = pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=negative)
            emb, pooled = (ne, npool) if negative else (pe, pp)
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=emb.dtype, device=self.device).expand(len(prompts), -1)
            return {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids}
        pe, ne = pipe.encode_prompt(prompts, self.device, 1, negative)
        return {"encoder_hidden_states": ne if negative else pe}

    def _load_images(self, idx: list[int]) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        r = self.resolution
        out = []
        for i in idx:
            with Image.open(self.images[i]) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = r / min(w, h)
                im = im.resize((max(r, round(w * s)), max(r, round(h * s))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - r) // 2, (h - r) // 2
                im = im.crop((left, top, left + r, top + r))
                out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        return torch.stack(out)

    @torch.no_grad()
    def load_batch(self, indices: torch.Tensor, with_data: bool = True) -> dict:
        idx = [int(i) for i in indices.cpu()]
        cond = self._encode([self._prompt_of(i) for i in idx])
        out = {"cond": cond}
        if with_data:
            vae = self.pipe.vae
            px = self._load_images(idx).to(self.device, vae.dtype)
            out["x0"] = vae.encode(px).latent_dist.mean.float() * vae.config.scaling_factor
        return out

    def null_cond(self, n: int) -> dict:
        return {k: v[:1].expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def call(self, model, x, t, cond: dict, timestep_cond=None) -> torch.Tensor:
        dtype = next(p for p in model.parameters()).dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).to(torch.float32)
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype),
                                           "time_ids": cond["time_ids"].to(dtype)}
        if timestep_cond is not None:
            kwargs["timestep_cond"] = timestep_cond.to(dtype)
        return model(x.to(dtype), t, **kwargs).sample.to(x.dtype)

    def _guidance_student(self, base, dim: int):
        """``UNet2DConditionModel`` with ``time_cond_proj_dim`` (as diffusers' LCM script), teacher weights,
        the new projection zero-initialised."""
        from diffusers import UNet2DConditionModel

        student = UNet2DConditionModel.from_config({**dict(base.config), "time_cond_proj_dim": dim})
        missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.no_grad():
            img = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    def export(self, name: str, model: torch.nn.Module, out_dir: Path, scheduler_config: dict, info: dict) -> Path:
        """Write the student into ``out_dir`` (plus ``distill.json``, the training record):

        * LoRA students: ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format, for
          ``pipe.load_lora_weights(out_dir)`` on the original pipeline with ``LCMScheduler``;
        * students with ``"lcm"`` boundary scalings: a complete pipeline folder (the teacher's class and
          components, the student UNet, an ``LCMScheduler``), loadable with ``DiffusionPipeline.from_pretrained``;
          a UNet with ``time_cond_proj_dim`` gets its guidance embedding from the SD/SDXL pipelines themselves;
        * other students (``"cm"`` scalings): ``unet/`` and ``scheduler/`` (a fewstep ``ConsistencyScheduler``),
          used as ``Pipeline.from_pretrained(teacher, unet=UNet2DConditionModel.from_pretrained(out/'unet'),
          scheduler=ConsistencyScheduler.from_pretrained(out/'scheduler'))`` (diffusers cannot import a
          fewstep scheduler from a ``model_index.json``).
        """
        from diffusers import LCMScheduler

        from .consistency import ConsistencyScheduler

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "distill.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if any("lora_" in n for n, _ in model.named_parameters()):
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(model)  # peft key format, which load_lora_weights reads
            type(self.pipe).save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
            return out_dir
        unet = copy.deepcopy(model).eval().requires_grad_(False).to(self._fp32_teacher.dtype)
        if scheduler_config.get("boundary") == "lcm":
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "prediction_type", "timestep_scaling", "original_inference_steps", "clip_sample")
            scheduler = LCMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
            pipe = type(self.pipe)(**{**self.pipe.components, "unet": unet, "scheduler": scheduler})
            pipe.save_pretrained(str(out_dir))
            return out_dir
        unet.save_pretrained(str(out_dir / "unet"))
        ConsistencyScheduler(**scheduler_config).save_pretrained(str(out_dir / "scheduler"))
        return out_dir


def build_source(model_cfg: dict, data_cfg: dict, device, needs_data: bool) -> Source:
    """The source a config's ``model`` and ``data`` sections describe (see :mod:`fewstep.distill.config`)."""
    if model_cfg["source"] == "digits":
        return DigitsSource(device, model_cfg["teacher_dtype"])
    return PipelineSource(model_cfg["path"], device, data_cfg.get("prompts"), data_cfg.get("images"),
                          data_cfg.get("resolution"), model_cfg["teacher_dtype"], needs_data)
