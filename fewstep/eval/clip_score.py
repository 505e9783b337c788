"""CLIP score from a local CLIP model directory (offline), with torchmetrics' definition.

``CLIPScore = max(mean_i 100 * cos(E_img(x_i), E_txt(p_i)), 0)`` with L2-normalised embeddings:
the *mean* is clamped, as ``torchmetrics.multimodal.CLIPScore`` does. The model is a local directory
that ``transformers.CLIPModel`` / ``CLIPProcessor`` load with ``local_files_only=True``. Images are
converted to uint8 first (float in [0, 1] rounded, anything else a ValueError), because
``CLIPImageProcessor`` rescales by 1/255 unconditionally. :class:`CLIPPairScores` runs the same
scores through the sharded :func:`fewstep.eval.features.extract_features`. Conventions and
pitfalls: docs/evaluation.md, "CLIP score".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .preprocess import to_rgb, to_uint8

__all__ = ["CLIPScorer", "CLIPPairScores", "clip_score", "clip_score_from_pair_scores"]


class CLIPScorer:
    """Embeds image/prompt pairs with a local CLIP model and scores them (see module docstring).

    ``CLIPScorer(model_dir, device="cpu")``; or ``CLIPScorer.from_model(model, processor)``.
    :meth:`pair_scores` returns the per-pair ``100 * cos`` (float64), :meth:`score` the clamped
    mean.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        *,
        model=None,
        processor=None,
    ):
        from transformers import CLIPModel, CLIPProcessor

        if model is None:
            if model_dir is None:
                raise ValueError("clip_model: pass a local CLIP model directory (no weights ship with fewstep)")
            p = Path(model_dir)
            if not p.is_dir():
                raise FileNotFoundError(
                    f"clip_model: {str(p)!r} is not a directory; pass a local CLIP model saved with "
                    "save_pretrained (e.g. a downloaded openai/clip-vit-base-patch16)"
                )
            model = CLIPModel.from_pretrained(str(p), local_files_only=True)
            processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
        if processor is None:
            raise ValueError("processor must be given together with model")
        from .features import resolve_device

        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor

    @classmethod
    def from_model(cls, model, processor, device: str | torch.device = "cpu") -> "CLIPScorer":
        """Wrap an already loaded ``CLIPModel`` and ``CLIPProcessor``."""
        return cls(model=model, processor=processor, device=device)

    @staticmethod
    def _embedding(out) -> torch.Tensor:
        # transformers >= 5 may return a model output instead of a tensor
        if isinstance(out, torch.Tensor):
            return out
        for key in ("image_embeds", "text_embeds", "pooler_output"):
            v = getattr(out, key, None)
            if v is not None:
                return v
        raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")

    def pixel_values(self, images) -> torch.Tensor:
        """CLIP pixel values (B, 3, S, S) float32 of ``images`` (as in :meth:`pair_scores`), made by
        the model's processor from uint8 RGB; the processor treats each image on its own."""
        return _pixel_values(self.processor, _rgb_uint8_list(images))

    @torch.no_grad()
    def scores_from_pixels(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``100 * cos`` per (image, prompt) pair, float64 (B,), from :meth:`pixel_values` output."""
        if len(pixel_values) != len(prompts):
            raise ValueError(f"got {len(pixel_values)} images but {len(prompts)} prompts")
        img = self._embedding(self.model.get_image_features(pixel_values=pixel_values.to(self.device)))
        tok = self.processor(
            text=list(prompts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        txt = self._embedding(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
        )
        img = img.double() / img.double().norm(dim=-1, keepdim=True)
        txt = txt.double() / txt.double().norm(dim=-1, keepdim=True)
        return (100.0 * (img * txt).sum(-1)).cpu()

    def pair_scores(self, images, prompts: list[str]) -> torch.Tensor:
        """``100 * cos`` per (image, prompt) pair, float64 (B,).

        ``images``: uint8 (B, C, H, W) or float in [0, 1] (rounded to uint8), or a list of
        (C, H, W) tensors; C in {1, 2, 3, 4} (grey replicated, alpha composited on white).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        imgs = _rgb_uint8_list(images)
        if len(imgs) != len(prompts):
            raise ValueError(f"got {len(imgs)} images but {len(prompts)} prompts")
        return self.scores_from_pixels(_pixel_values(self.processor, imgs), prompts)

    def score(self, images, prompts: list[str], batch_size: int = 32) -> float:
        """Clamped mean CLIP score over all pairs (torchmetrics ``CLIPScore`` definition)."""
        n = len(prompts)
        s = torch.cat(
            [self.pair_scores(images[i : i + batch_size], prompts[i : i + batch_size]) for i in range(0, n, batch_size)]
        )
        return clip_score_from_pair_scores(s)


def clip_score_from_pair_scores(scores: torch.Tensor) -> float:
    """CLIP score from per-pair ``100 * cos`` values (N,) or (N, 1): ``max(mean, 0)``, torchmetrics'
    definition (the mean is clamped, not each pair). Raises ValueError when there are none."""
    scores = torch.as_tensor(scores).flatten()
    if len(scores) < 1:
        raise ValueError("no images to score")
    return max(float(scores.mean()), 0.0)


def _rgb_uint8_list(images) -> list[torch.Tensor]:
    """(B, C, H, W) tensor or list of (C, H, W) tensors -> list of uint8 RGB (3, H, W) CPU tensors."""
    if isinstance(images, (list, tuple)):
        imgs = [to_rgb(to_uint8(im).unsqueeze(0))[0] for im in images]
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        imgs = list(to_rgb(to_uint8(images)))
    else:
        raise TypeError("images must be a (B, C, H, W) tensor or a list of (C, H, W) tensors")
    return [im.cpu() for im in imgs]


def _pixel_values(processor, imgs: list[torch.Tensor]) -> torch.Tensor:
    """The processor's pixel values of uint8 RGB images: the one place images enter CLIP."""
    return processor(images=imgs, return_tensors="pt")["pixel_values"]


class _CLIPPixels:
    """Picklable per-image preprocessing for data loaders: uint8 (3, H, W) -> CLIP pixel values."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return _pixel_values(self.processor, _rgb_uint8_list([image]))[0]


class CLIPPairScores(nn.Module):
    """CLIP score as an extractor for :func:`fewstep.eval.features.extract_features`, which shards
    the images across processes: the "feature" of source image ``i`` is its pair score
    ``100 * cos(E_img(image_i), E_txt(prompts[i]))`` (float64, shape (B, 1)), the same numbers as
    :meth:`CLIPScorer.pair_scores`. ``prompts`` has one entry per image of the source, by source
    index (bad files that get skipped keep their slot). With ``keep_features=True`` the result's
    features are the per-pair scores in source order; :func:`clip_score_from_pair_scores` of them
    is the CLIP score.
    """

    num_features = 1

    def __init__(self, scorer: CLIPScorer, prompts: list[str], name: str = "clip"):
        super().__init__()
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        self.scorer, self.prompts, self.name = scorer, list(prompts), name

    def meta(self) -> dict:
        """Extractor and preprocessing identifiers (recorded in the statistics)."""
        return {"extractor": f"clip-pair-score:{self.name}", "preprocess": "clip-processor-uint8", "dim": 1}

    def prepare_fn(self):
        """Per-image preprocessing: the CLIP image processor on uint8 RGB (picklable)."""
        return _CLIPPixels(self.scorer.processor)

    def embed_indexed(self, pixel_values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Pair scores (B, 1) float64 of prepared images whose source indices are ``index``."""
        prompts = [self.prompts[i] for i in index.tolist()]
        return self.scorer.scores_from_pixels(pixel_values, prompts).unsqueeze(1), None

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Not available: a pair score needs the prompt, i.e. the image's index (use ``embed_indexed``)."""
        raise TypeError("CLIPPairScores scores (image, prompt) pairs: call embed_indexed(pixel_values, index)")


def clip_score(
    images, prompts: list[str], clip_model: str | os.PathLike | CLIPScorer, device="cpu", batch_size: int = 32
) -> float:
    """CLIP score of ``images`` against ``prompts`` with a local model directory or a
    :class:`CLIPScorer`; see the module docstring for the definition and input conventions."""
    scorer = clip_model if isinstance(clip_model, CLIPScorer) else CLIPScorer(clip_model, device)
    return scorer.score(images, prompts, batch_size)
