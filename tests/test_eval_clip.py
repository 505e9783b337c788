"""CLIP score on a tiny randomly initialised CLIP, against transformers' own forward and torchmetrics."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    chars = string.ascii_lowercase + string.digits + ".,!?'"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=eos)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(d)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d


PROMPTS = ["a cat", "two dogs", "a red car", "blue sky at night"]


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=g)


def test_clip_score_matches_transformers_forward_and_torchmetrics(clip_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from fewstep.eval.clip_score import CLIPScorer, clip_score

    imgs = _images()
    scorer = CLIPScorer(clip_dir)
    per_pair = scorer.pair_scores(imgs, PROMPTS)

    # reference 1: CLIPModel.forward's normalised embeddings
    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(**proc(text=PROMPTS, images=list(imgs), return_tensors="pt", padding=True))
    ref = 100 * (out.image_embeds * out.text_embeds).sum(-1)
    torch.testing.assert_close(per_pair.float(), ref, atol=1e-4, rtol=1e-5)

    # reference 2: torchmetrics' CLIPScore. torchmetrics 1.9 expects get_*_features to return a
    # tensor, transformers >= 5 returns a model output: a thin adapter bridges only that.
    class Adapter(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            return self.m.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.m.get_text_features(*a, **k).pooler_output

    tm = CLIPScore(model_name_or_path=lambda: (Adapter(model), proc))
    tm.update(list(imgs), PROMPTS)
    assert clip_score(imgs, PROMPTS, scorer) == pytest.approx(tm.compute().item(), abs=1e-3)


def test_float_input_is_not_rescaled_twice(clip_dir):
    from fewstep.eval.clip_score import CLIPScorer

    scorer = CLIPScorer(clip_dir)
    imgs = _images()
    torch.testing.assert_close(scorer.pair_scores(imgs.float() / 255, PROMPTS), scorer.pair_scores(imgs, PROMPTS))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.pair_scores(imgs.float(), PROMPTS)  # [0, 255] floats would be a silent error
    with pytest.raises(ValueError, match="prompts"):
        scorer.pair_scores(imgs, PROMPTS[:2])
    with pytest.raises(FileNotFoundError, match="clip_model"):
        CLIPScorer(clip_dir / "missing")


def test_clip_cli(clip_dir, tmp_path, capsys):
    from fewstep.apps.cli import main
    from fewstep.eval.clip_score import CLIPScorer

    imgs = _images()
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    gen = tmp_path
    (gen / "p.txt").rename(tmp_path.parent / f"{tmp_path.name}_p.txt")
    prompts = tmp_path.parent / f"{tmp_path.name}_p.txt"
    code = main(["eval", "clip", str(gen), "--prompts", str(prompts), "--clip-model", str(clip_dir), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["gen"]["n"] == 4
    expected = max(float(CLIPScorer(clip_dir).pair_scores(imgs, PROMPTS).mean()), 0.0)
    assert res["value"] == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(res["value"])


def test_clip_cli_shards_over_two_ranks_and_equals_one_process(clip_dir, tmp_path, monkeypatch):
    """``fewstep eval clip`` as rank 0 and rank 1 of 2 (threads standing in for processes, see
    :func:`test_eval_common.run_as_ranks`): 5 images + 1 unreadable file with its own prompt line,
    so the shards are uneven (3 + 2) and prompts must follow source indices. Each rank scores only
    its share, and both report the single-process CLIP score."""
    import threading

    from test_eval_common import run_as_ranks

    from fewstep.apps import eval_runners
    from fewstep.apps.cli import build_parser
    from fewstep.eval.clip_score import CLIPScorer

    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8, generator=g)
    prompts = PROMPTS + ["green tree"]
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(gen / f"{i}.png")
    (gen / "1b.png").write_text("not an image")  # file 3 of 6 in sorted order
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2] + ["prompt of the bad file"] + prompts[2:]) + "\n")
    args = build_parser().parse_args(["eval", "clip", str(gen), "--prompts", str(tmp_path / "p.txt"),
                                      "--clip-model", str(clip_dir), "--batch-size", "2", "--skip-bad",
                                      "--device", "cpu", "--no-progress"])  # fmt: skip

    seen = {"rank0": [], "rank1": []}
    real = CLIPScorer.scores_from_pixels

    def recording(self, pixel_values, batch_prompts):
        seen[threading.current_thread().name] += batch_prompts
        return real(self, pixel_values, batch_prompts)

    monkeypatch.setattr(CLIPScorer, "scores_from_pixels", recording)
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        outs = run_as_ranks(monkeypatch, 2, lambda r: eval_runners.run_clip(args, torch.device("cpu"), r, 2))
    assert seen == {"rank0": [prompts[0], prompts[2], prompts[4]], "rank1": [prompts[1], prompts[3]]}
    monkeypatch.undo()

    single = CLIPScorer(clip_dir).score(imgs, prompts)
    for out in outs:
        assert out["gen"]["n"] == 5 and out["gen"]["per_process"] == [3, 2] and out["gen"]["skipped"] == ["1b.png"]
        # shards batch other images/prompts together: float32 round-off only (measured 2e-7 on ~30)
        assert out["value"] == pytest.approx(single, rel=0, abs=2e-6)
