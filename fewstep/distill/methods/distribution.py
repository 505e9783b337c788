"""One-step generators by distribution matching: f-distill (Xu, Nie, Vahdat 2025) and DisBack
(Zhang et al., ICLR 2025), on one variational-score-distillation core (DMD, Yin et al. 2024).

Models (see docs/fdistill.md):

* ``generator`` -- a copy of the teacher used as a one-step map ``G(z) = f(z, t_gen)`` with the CM
  boundary scalings of :mod:`fewstep.distill.consistency` (at ``t_gen`` near ``T`` this is the
  network's clean prediction, so at initialisation ``G`` is the teacher's one-step denoiser, and
  the exported student samples with :class:`~fewstep.distill.consistency.ConsistencyScheduler`);
* the frozen teacher ``s_real`` (the "real" score; DisBack swaps in recorded checkpoints);
* ``critic`` -- the fake score ``s_fake`` (a copy of the teacher trained by denoising score matching
  on detached generator samples) and, when used, a small discriminator head on the teacher's
  mid-block features (logistic loss, real = noised training data, fake = noised generator samples),
  whose logit estimates ``log p_t / q_t``.

One iteration (two-time-scale update): ``critic_repeat`` critic updates (each on a fresh batch),
then one generator update with the loss ``0.5 mean((x - sg(x - g))^2) + gan_weight * softplus(-D)``,
``g_i = h(r_i) (x0_fake - x0_real) / mean|x_i - x0_real|`` (:func:`fewstep.distill.fdiv.matching_gradient`),
``x = G(z)`` noised to ``t ~ U[t_low, t_high] T``. ``h`` is the f-divergence weight of
:mod:`fewstep.distill.fdiv` (``rkl``: ``h = 1``, DMD/DMD2).

DisBack adds, before that: stage 1 (``degradation_steps`` critic-only steps) fits the fake score to
the frozen initial generator, saving it every ``degradation_every`` steps (the degradation path
``s_0 = teacher, s_1, ..., s_N``); stage 2 starts with the fake score at ``s_N`` and the real score
at ``s_{N-1}``, moving one checkpoint back towards the teacher every ``backtrack_every`` generator
steps and staying on the teacher after ``s_0``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch

from ...schedule import from_x0_eps, to_x0_eps
from ..config import Option
from ..fdiv import (
    F_NAMES,
    RatioBins,
    density_ratio,
    discriminator_loss,
    generator_gan_loss,
    get_f,
    matching_gradient,
    matching_loss,
)
from .base import Method, Phase


class DiscriminatorHead(torch.nn.Module):
    """A light classifier on a feature map (B, C, H, W) -> logit (B,): two 3x3 conv + GroupNorm +
    SiLU blocks (the second with stride 2 when the map is larger than 4x4), global mean, linear.
    The final layer starts at zero, so the initial logit is 0 (r = 1, h = h(1) for every sample)."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = int(hidden or channels)
        groups = math.gcd(32, hidden)
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(channels, hidden, 3, padding=1),
                                          torch.nn.GroupNorm(groups, hidden), torch.nn.SiLU())
        self.block2 = torch.nn.Sequential(torch.nn.Conv2d(hidden, hidden, 3, padding=1),
                                          torch.nn.GroupNorm(groups, hidden), torch.nn.SiLU())
        self.down = torch.nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)
        self.out = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.block1(feats.float())
        if h.shape[-1] > 4:
            h = self.down(h)
        h = self.block2(h)
        return self.out(h.mean(dim=(2, 3))).squeeze(1)


class Critic(torch.nn.Module):
    """The models of the critic update, trained by one optimizer: ``fake`` (fake score) and ``head``
    (discriminator head, or None). ``critic(fn)`` returns ``fn(critic)``: the loss is computed inside
    ``forward``, so a DDP wrapper sees one forward pass over both models."""

    def __init__(self, fake: torch.nn.Module, head: torch.nn.Module | None):
        super().__init__()
        self.fake = fake
        self.head = head

    def forward(self, fn):
        return fn(self)


def feature_channels(model: torch.nn.Module) -> int:
    """Channels of the mid-block output of a diffusers UNet (the discriminator's input)."""
    ch = getattr(getattr(model, "config", None), "block_out_channels", None)
    if not ch or not hasattr(model, "mid_block") or model.mid_block is None:
        raise ValueError(f"{type(model).__name__} has no mid_block: the discriminator head reads its features")
    return int(ch[-1])


@contextlib.contextmanager
def mid_features(model: torch.nn.Module, enabled: bool = True):
    """Capture the mid-block output of ``model`` during the forward passes inside the block:
    yields a dict whose ``"mid"`` holds the last one (nothing is captured when not ``enabled``)."""
    store: dict[str, torch.Tensor] = {}
    if not enabled:
        yield store
        return
    handle = model.mid_block.register_forward_hook(lambda m, i, o: store.__setitem__("mid", o))
    try:
        yield store
    finally:
        handle.remove()


def _range_check(v) -> str | None:
    return None if 0 <= v[0] < v[1] <= 1 else "needs 0 <= low < high <= 1"


class FDistill(Method):
    """f-distill (and, with ``f = "rkl"``, DMD/DMD2); see the module docstring."""

    name = "fdistill"
    ema_model = "generator"
    needs_data = True
    options = {
        "f": Option("js", "str", "f-divergence (weight h(r)); rkl = reverse KL = DMD", choices=F_NAMES),
        "critic_repeat": Option(5, "int", "critic (fake score + discriminator) updates per generator update",
                                low=1),
        "critic_lr_scale": Option(1.0, "float", "critic lr / generator lr", low=0, low_open=True),
        "gan_weight": Option(1e-3, "float", "weight of the generator's GAN loss (0: off)", low=0),
        "discriminator": Option("auto", "str", "discriminator head on the teacher's mid-block features: auto "
                                "(when f != rkl or gan_weight > 0), on, off", choices=("auto", "on", "off")),
        "disc_hidden": Option(None, "int", "discriminator head width (null: the feature channels)", low=1,
                              nullable=True),
        "ratio_lower": Option(0.1, "float", "lower clip of r = exp(logit)", low=0, low_open=True, high=1),
        "ratio_upper": Option(20.0, "float", "upper clip of r", low=1),
        "ratio_normalization": Option(False, "bool", "divide r by a per-time-bin running mean"),
        "ratio_bins": Option(10, "int", "time bins of ratio_normalization", low=1),
        "ratio_ema_rate": Option(0.0, "float", "EMA rate of the bin means (0: current batch)", low=0, high=1,
                                 high_open=True),
        "time_range": Option([0.02, 0.98], "list", "t ~ U[low, high] * T for the matching and critic losses",
                             item="float", length=2, check=_range_check),
        "generator_timestep": Option(None, "float", "t_gen of G(z) = f(z, t_gen) (null: the schedule's t_max)",
                                     low=0, nullable=True),
        "guidance": Option(1.0, "float", "teacher (real score) guidance scale (1: no CFG)", low=1),
        "sigma_data": Option(0.5, "float", "data std of the CM boundary scalings of G", low=0, low_open=True),
    }

    @classmethod
    def check(cls, cfg: dict) -> None:
        o = cfg["method"]
        get_f(o["f"])
        if o["discriminator"] == "off" and (get_f(o["f"]).name != "rkl" or o["gan_weight"] > 0):
            raise ValueError(f"config key 'method.discriminator' = 'off' needs method.f = 'rkl' and "
                             f"method.gan_weight = 0 (f = {o['f']!r} reads the density ratio from the "
                             f"discriminator; gan_weight = {o['gan_weight']:g})")

    # ---- setup -----------------------------------------------------------------------------------
    def uses_discriminator(self) -> bool:
        o = self.opts
        if o["discriminator"] != "auto":
            return o["discriminator"] == "on"
        return get_f(o["f"]).name != "rkl" or o["gan_weight"] > 0

    def build(self) -> dict[str, torch.nn.Module]:
        src, o = self.source, self.opts
        s = src.schedule
        self.t_gen = float(o["generator_timestep"] if o["generator_timestep"] is not None else s.t_max)
        if not s.t_min < self.t_gen <= s.t_max:
            raise ValueError(f"config key 'method.generator_timestep' = {self.t_gen} must lie in "
                             f"({s.t_min}, {s.t_max}]")
        lo, hi = o["time_range"]
        self.t_low, self.t_high = s.t_min + lo * (s.t_max - s.t_min), s.t_min + hi * (s.t_max - s.t_min)
        self.f = get_f(o["f"])
        generator = src.build_student("copy")
        head = None
        if self.uses_discriminator():
            head = DiscriminatorHead(feature_channels(src.teacher), o["disc_hidden"]).to(self.device)
        self.critic = Critic(src.build_student("copy"), head)
        self.bins = None
        if o["ratio_normalization"] and head is not None:
            self.bins = RatioBins(o["ratio_bins"], self.t_low, self.t_high, o["ratio_ema_rate"]).to(self.device)
        return {"generator": generator, "critic": self.critic}

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"ratio_bins": self.bins} if self.bins is not None else {}

    def lr_scale(self, model: str) -> float:
        return self.opts["critic_lr_scale"] if model == "critic" else 1.0

    def phases(self, step: int) -> list[Phase]:
        return [Phase("critic", "critic", repeat=self.opts["critic_repeat"],
                      needs_data=self.critic.head is not None),
                Phase("generator", "generator", needs_data=False)]

    def draw(self, phase: Phase, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        shape = (n, *self.source.sample_shape)
        out = {"z": torch.randn(shape, generator=generator),
               "t": self.t_low + (self.t_high - self.t_low) * torch.rand(n, generator=generator, dtype=torch.float64),
               "eps": torch.randn(shape, generator=generator)}
        if phase.needs_data:
            out["t_real"] = self.t_low + (self.t_high - self.t_low) * torch.rand(n, generator=generator,
                                                                                  dtype=torch.float64)
            out["eps_real"] = torch.randn(shape, generator=generator)
        return out

    # ---- pieces ----------------------------------------------------------------------------------
    def _levels(self, t: torch.Tensor, ref: torch.Tensor):
        s, shape = self.source.schedule, (-1, *([1] * (ref.ndim - 1)))
        tc = t.double().cpu()
        a = torch.as_tensor(s.alpha(tc), dtype=ref.dtype, device=ref.device).reshape(shape)
        sg = torch.as_tensor(s.sigma(tc), dtype=ref.dtype, device=ref.device).reshape(shape)
        return a, sg

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a, s = self._levels(t, x0)
        return a * x0 + s * eps.to(x0)

    def x0_of(self, raw: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._levels(t, x_t)
        return to_x0_eps(raw.float(), x_t.float(), a, s, self.source.prediction_type)[0]

    def generate(self, model: torch.nn.Module, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """``G(z) = f(z, t_gen)`` with the CM boundary scalings (:func:`consistency_output`)."""
        from ..consistency import consistency_output

        src = self.source
        raw = src.call(model, z, torch.full((z.shape[0],), self.t_gen, device=z.device), cond)
        return consistency_output(raw.float(), z.float(), self.t_gen, src.schedule, src.prediction_type, "cm",
                                  self.opts["sigma_data"], 10.0, 0.0)

    def real_model(self, step: int) -> torch.nn.Module:
        """The real score of generator step ``step`` (f-distill: the teacher)."""
        return self.source.teacher

    def real_x0(self, model, x_t, t, cond, with_features: bool, grad: bool):
        """The real score's clean prediction at ``x_t`` (with CFG when ``guidance`` > 1) and, when
        ``with_features``, the teacher's mid-block features of the conditional pass (``grad``: keep the
        graph to ``x_t``, for the generator's GAN loss)."""
        src, w = self.source, self.opts["guidance"]
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self.autocast():
            feats = None
            if with_features and model is not src.teacher:
                with mid_features(src.teacher) as store:
                    src.call(src.teacher, x_t, t, cond)
                feats = store["mid"]
            with mid_features(src.teacher, with_features and model is src.teacher) as store:
                raw = src.call(model, x_t, t, cond)
            feats = store.get("mid", feats)
        with torch.no_grad(), self.autocast():
            raw = raw.detach()
            if w != 1.0:
                raw_u = src.call(model, x_t.detach(), t, src.null_cond(x_t.shape[0]))
                raw = raw_u + w * (raw - raw_u)
        return self.x0_of(raw, x_t.detach(), t), feats

    def teacher_features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        src = self.source
        with torch.no_grad(), self.autocast(), mid_features(src.teacher) as store:
            src.call(src.teacher, x_t, t, cond)
        return store["mid"]

    def weights(self, logit: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, r)``: the normalised f-weights and the (clipped, bin-normalised) ratio of a batch."""
        o = self.opts
        r = density_ratio(logit, o["ratio_lower"], o["ratio_upper"])
        if self.bins is not None:
            r = self.bins.normalize(r, t)
        h = self.f.h(r)
        mean = h.mean()
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean.detach(), reduction="mean")
        return h / mean.clamp_min(1e-12), r

    # ---- losses ----------------------------------------------------------------------------------
    def critic_loss(self, batch: dict) -> torch.Tensor:
        """Fake-score DSM on detached generator samples (+ the discriminator's logistic loss)."""
        cond, t, eps = batch["cond"], batch["t"], batch["eps"]
        with torch.no_grad(), self.autocast():
            x = self.generate(self.raw("generator"), batch["z"], cond).detach()
        x_t = self.noised(x, t, eps)
        a, s = self._levels(t, x)
        target = from_x0_eps(x, eps.to(x), a, s, self.source.prediction_type)

        def fn(critic: Critic) -> torch.Tensor:
            with self.autocast():
                pred = self.source.call(critic.fake, x_t, t, cond)
            loss = (pred.float() - target.float()).square().mean()
            if critic.head is not None:
                x_real = self.noised(batch["x0"].float(), batch["t_real"], batch["eps_real"])
                fake_logit = critic.head(self.teacher_features(x_t, t, cond))
                real_logit = critic.head(self.teacher_features(x_real, batch["t_real"], cond))
                loss = loss + discriminator_loss(real_logit, fake_logit)
            return loss

        return self.net("critic")(fn)

    def generator_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        o = self.opts
        cond, t = batch["cond"], batch["t"]
        with self.autocast():
            x = self.generate(self.net("generator"), batch["z"], cond)
        x_t = self.noised(x, t, batch["eps"])
        head = self.raw("critic").head
        gan = head is not None and o["gan_weight"] > 0
        real_x0, feats = self.real_x0(self.real_model(step), x_t if gan else x_t.detach(), t, cond,
                                      head is not None, grad=gan)
        with torch.no_grad(), self.autocast():
            fake_x0 = self.x0_of(self.source.call(self.raw("critic").fake, x_t.detach(), t, cond), x_t.detach(), t)
        h, logs = None, {}
        if head is not None:
            logit = head(feats)
            h, r = self.weights(logit, t)
            logs = {"r_mean": float(r.mean()), "h_max": float(h.max())}
        grad = matching_gradient(x.detach().float(), real_x0.float(), fake_x0.float(), h)
        loss = matching_loss(x, grad)
        if gan:
            loss = loss + o["gan_weight"] * generator_gan_loss(logit)
        return loss, logs

    def loss(self, phase: Phase, batch: dict, step: int):
        if phase.model == "critic":
            return self.critic_loss(batch), {}
        return self.generator_loss(batch, step)

    # ---- sampling and export ---------------------------------------------------------------------
    def scheduler_config(self) -> dict:
        """The :class:`~fewstep.distill.consistency.ConsistencyScheduler` config that samples ``G``: CM
        scalings, boundary 0, one step at ``t_gen`` (more steps re-noise on LCM's 50-point grid)."""
        sc = self.source.scheduler_config
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        t_gen = int(self.t_gen) if float(self.t_gen).is_integer() else self.t_gen
        return {**{k: sc[k] for k in keys if k in sc}, "prediction_type": self.source.prediction_type,
                "boundary": "cm", "sigma_data": self.opts["sigma_data"], "timestep_scaling": 10.0,
                "boundary_timestep": 0.0, "original_inference_steps": 50, "step_timesteps": {"1": [t_gen]}}

    def sample(self, model, noise, cond, num_steps, guidance=1.0, generator=None) -> torch.Tensor:
        from fewstep.sample import sample

        from ..consistency import ConsistencyScheduler

        scheduler = ConsistencyScheduler(**self.scheduler_config())

        def fn(x, t, c):
            return self.source.call(model, x, t, c)

        x, _ = sample(fn, noise, scheduler, num_steps, cond=cond, generator=generator)
        return x

    def export(self, model, out_dir: Path, info: dict) -> Path:
        info = {**info, "guidance_range": None, "one_step": True, "f": self.f.name}
        name = self.cfg["export"]["name"] or self.name
        return self.source.export(name, model, out_dir, self.scheduler_config(), info)


class DisBack(FDistill):
    """DisBack (see the module docstring): degradation recording, then backtracking along the path."""

    name = "disback"
    options = {
        **FDistill.options,
        "f": Option("rkl", "str", "f-divergence of the matching loss (rkl: DMD, as the paper)", choices=F_NAMES),
        "gan_weight": Option(0.0, "float", "weight of the generator's GAN loss (0: off)", low=0),
        "degradation_steps": Option(400, "int", "stage 1: fake-score steps on the frozen initial generator", low=1),
        "degradation_every": Option(100, "int", "stage 1: save the degraded score every M steps", low=1),
        "backtrack_every": Option(100, "int", "stage 2: generator steps per path checkpoint", low=1),
    }

    @classmethod
    def check(cls, cfg: dict) -> None:
        super().check(cfg)
        o, steps = cfg["method"], cfg["train"]["steps"]
        if o["degradation_steps"] % o["degradation_every"]:
            raise ValueError(f"config key 'method.degradation_steps' = {o['degradation_steps']} must be a multiple "
                             f"of method.degradation_every = {o['degradation_every']}")
        if o["degradation_steps"] >= steps:
            raise ValueError(f"config key 'method.degradation_steps' = {o['degradation_steps']} leaves no stage-2 "
                             f"step within train.steps = {steps}")

    @property
    def num_path(self) -> int:
        """N: recorded checkpoints s_1..s_N (s_0 is the teacher)."""
        return self.opts["degradation_steps"] // self.opts["degradation_every"]

    def build(self) -> dict[str, torch.nn.Module]:
        models = super().build()
        self.real = copy.deepcopy(self.source.teacher).eval().requires_grad_(False)
        self._real_index: int | None = None
        return models

    def path_dir(self) -> Path:
        return Path(self.accelerator.project_dir) / "degradation"

    def path_file(self, k: int) -> Path:
        return self.path_dir() / f"path-{k:03d}.safetensors"

    def phases(self, step: int) -> list[Phase]:
        if step < self.opts["degradation_steps"]:
            return [Phase("degrade", "critic", repeat=1, needs_data=self.critic.head is not None)]
        return super().phases(step)

    def target_index(self, step: int) -> int:
        """The path index of the real score at trainer step ``step`` (stage 2): ``N - 1`` for the first
        ``backtrack_every`` generator steps, then one less every ``backtrack_every`` steps, down to 0
        (the teacher), where it stays. The paper's rule (Alg. 1 of arXiv 2408.15991: the target moves
        to the next checkpoint every fixed interval of generator iterations); the official code instead
        compares a checkpoint number with the global step (see docs/fdistill.md)."""
        o = self.opts
        gen_step = step - o["degradation_steps"]
        if gen_step < 0:
            raise ValueError(f"step {step} is in stage 1 (degradation), which has no target")
        return max(0, self.num_path - 1 - gen_step // o["backtrack_every"])

    def real_model(self, step: int) -> torch.nn.Module:
        k = self.target_index(step)
        if k == 0:
            return self.source.teacher
        if self._real_index != k:
            from safetensors.torch import load_file

            f = self.path_file(k)
            if not f.exists():
                raise FileNotFoundError(f"DisBack degradation checkpoint {f} is missing (stage 1 writes it)")
            self.real.load_state_dict(load_file(str(f), device=str(self.device)))
            self._real_index = k
        return self.real

    def loss(self, phase: Phase, batch: dict, step: int):
        if phase.name == "degrade":
            return self.critic_loss(batch), {}
        return super().loss(phase, batch, step)

    def after_update(self, phase: Phase, step: int) -> None:
        o = self.opts
        if phase.name != "degrade" or (step + 1) % o["degradation_every"]:
            return
        if self.accelerator.is_main_process:
            from ..checkpoints import save_weights

            self.path_dir().mkdir(parents=True, exist_ok=True)
            save_weights(self.path_file((step + 1) // o["degradation_every"]), self.raw("critic").fake.state_dict())
        self.accelerator.wait_for_everyone()

    def export(self, model, out_dir: Path, info: dict) -> Path:
        o = self.opts
        info = {**info, "degradation_path": {"checkpoints": self.num_path, "every": o["degradation_every"],
                                             "backtrack_every": o["backtrack_every"]}}
        return super().export(model, out_dir, info)
