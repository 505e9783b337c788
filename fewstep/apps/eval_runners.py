"""The metric runners of ``fewstep eval`` (:mod:`fewstep.apps.cmd_eval` parses the arguments).

Each runner takes the parsed arguments, the device, this process's rank and the world size, runs
one metric through :func:`fewstep.eval.features.extract_features` (the one sharded feature pass)
and returns the result dict that ``fewstep eval`` prints. Heavy modules are imported inside.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .options import DIGITS


def _is_npz(spec: str) -> bool:
    return spec.lower().endswith(".npz") and Path(spec).is_file()


def _first_image_size(spec: str) -> int | None:
    if spec == DIGITS or _is_npz(spec):
        return None
    from fewstep.eval.images import open_image_source

    src = open_image_source(spec)
    for i in range(min(len(src), 20)):
        try:
            _, h, w = src.load(i).shape
        except Exception:
            continue
        return h if (h == w and h % 8 == 0) else None
    return None


def _source(spec: str, args):
    from fewstep.eval.images import TensorImageSource, open_image_source

    if spec == DIGITS:
        from fewstep.eval.fd_digits import digits_reference_images

        size = args.digits_size or _first_image_size(args.gen) or 32
        imgs, _ = digits_reference_images(size)
        return TensorImageSource(
            imgs, description=f"digits (held-out test split, {len(imgs)} images, nearest x{size // 8} to {size}px RGB)"
        )
    return open_image_source(spec)


def _extract(src, extractor, args, device, keep_features: bool, checkpoint=None):
    """:func:`fewstep.eval.features.extract_features` with the CLI's options: the one sharded
    feature pass behind every metric."""
    from fewstep.eval.features import extract_features

    return extract_features(
        src,
        extractor,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        skip_bad=args.skip_bad,
        keep_features=keep_features,
        progress=not args.no_progress,
        checkpoint=checkpoint,
    )


def _side(spec: str, extractor, args, device, need_features: bool, checkpoint=None):
    """(FeatureStats, features or None, description, skipped, images per process or None) of one
    side; ``checkpoint`` makes the feature pass resumable (see
    :func:`fewstep.eval.features.extract_features`)."""
    from fewstep.eval.frechet import FeatureStats

    if _is_npz(spec):
        st = FeatureStats.load(spec)
        feats = None
        if need_features:
            import numpy as np
            import torch

            with np.load(spec) as z:
                if "feats" not in z:
                    raise ValueError(
                        f"{spec} holds no features; KID needs them: "
                        "recompute with `fewstep eval stats SRC OUT --keep-features`"
                    )
                feats = torch.from_numpy(z["feats"])
        return st, feats, f"statistics {spec}", [], None
    src = _source(spec, args)
    res = _extract(src, extractor, args, device, need_features, checkpoint)
    return res.stats, res.features, src.description, res.skipped, res.per_process


def _inception(args):
    from fewstep.eval.inception import InceptionFeatures

    return InceptionFeatures(args.inception_weights, args.preprocess)


def _label_of(name: str) -> int | None:
    parts = Path(name).parts
    if len(parts) > 1 and re.fullmatch(r"\d", parts[-2]):
        return int(parts[-2])
    m = re.match(r"(\d)[_-]", parts[-1])
    return int(m.group(1)) if m else None


def _record_labels(src) -> dict[str, int] | None:
    """Intended class per image file of a ``fewstep sample`` output folder (its record's
    ``settings.labels``, in generation order = ``images`` order), or None."""
    rec = getattr(src, "record", None)
    if rec is None:
        return None
    labels = (rec.get("settings") or {}).get("labels")
    if not isinstance(labels, list) or len(labels) != len(rec["images"]):
        return None
    return {str(name): int(lab) for name, lab in zip(rec["images"], labels)}


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def run_fid_kid(args, device, rank, world) -> dict:
    from fewstep.eval.frechet import check_sample_size, fid_from_stats

    kid = args.metric == "kid"
    # statistics on both sides need no network
    ext = None if (not kid and _is_npz(args.gen) and _is_npz(args.ref)) else _inception(args)
    g_st, g_f, g_desc, g_skip, g_pp = _side(args.gen, ext, args, device, kid)
    r_st, r_f, r_desc, r_skip, r_pp = _side(args.ref, ext, args, device, kid)
    out = {
        "gen": {"source": g_desc, "n": g_st.n, "skipped": [n for n, _ in g_skip], "per_process": g_pp},
        "ref": {"source": r_desc, "n": r_st.n, "skipped": [n for n, _ in r_skip], "per_process": r_pp},
        "extractor": g_st.meta.get("extractor"),
        "preprocess": g_st.meta.get("preprocess"),
    }
    if kid:
        from fewstep.eval.metrics import kernel_inception_distance  # imports torchmetrics (slow)

        g_st.check_compatible(r_st)
        check_sample_size(min(g_st.n, r_st.n), 2, "images")
        size = min(args.subset_size, len(g_f), len(r_f))
        if size < args.subset_size:
            print(
                f"note: subset size capped at {size} (fewer images than --subset-size {args.subset_size})",
                file=sys.stderr,
            )
        m, s = kernel_inception_distance(r_f, g_f, args.subsets, size, seed=args.seed)
        out.update(value=m, std=s, subsets=args.subsets, subset_size=size)
    else:
        out["value"] = fid_from_stats(g_st, r_st)
    return out


def run_stats(args, device, rank, world) -> dict:
    import numpy as np

    # long reference passes are resumable: an interrupted run continues from OUT.partial
    st, feats, desc, skipped, per_process = _side(args.src, _inception(args), args, device, args.keep_features,
                                     checkpoint=f"{args.out}.partial")
    if rank == 0:
        st.meta["source"] = desc
        st.save(args.out)
        if feats is not None:  # add the features next to mu/sigma (clean-fid's "feats" key)
            with np.load(args.out) as z:
                data = dict(z)
            np.savez(args.out, **data, feats=feats.numpy())
    return {
        "value": None,
        "out": args.out,
        "n": st.n,
        "source": desc,
        "skipped": [n for n, _ in skipped],
        "per_process": per_process,
        "extractor": st.meta.get("extractor"),
        "preprocess": st.meta.get("preprocess"),
    }


def run_clip(args, device, rank, world) -> dict:
    from fewstep.eval.clip_score import CLIPPairScores, CLIPScorer, clip_score_from_pair_scores
    from fewstep.eval.images import open_image_source

    src = open_image_source(args.gen)
    if args.prompts.lower().endswith(".json"):
        with open(args.prompts, encoding="utf-8") as f:
            mapping = json.load(f)
        missing = [n for n in src.names if n not in mapping]
        if missing:
            raise ValueError(f"--prompts: no prompt for {len(missing)} image(s), e.g. {missing[:5]}")
        prompts = [mapping[n] for n in src.names]
    else:
        prompts = _read_lines(args.prompts)
        if len(prompts) != len(src):
            raise ValueError(
                f"--prompts has {len(prompts)} non-empty lines for {len(src)} files in {args.gen} "
                "(one per file, sorted order)"
            )
    # per-pair scores (float64) of this process's shard, gathered in file order
    res = _extract(src, CLIPPairScores(CLIPScorer(args.clip_model, device), prompts), args, device, True)
    return {
        "value": clip_score_from_pair_scores(res.features),
        "gen": {"source": src.description, "n": res.stats.n, "skipped": [n for n, _ in res.skipped],
                "per_process": res.per_process},
        "clip_model": str(args.clip_model),
        "definition": "max(mean(100*cos), 0) (torchmetrics CLIPScore)",
    }


def run_fd_digits(args, device, rank, world) -> dict:
    import torch

    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits_from_stats
    from fewstep.eval.frechet import FeatureStats
    from fewstep.eval.images import open_image_source

    src = open_image_source(args.gen)
    if args.labels:
        all_labels = [int(s) for s in _read_lines(args.labels)]
        if len(all_labels) != len(src):
            raise ValueError(f"--labels has {len(all_labels)} lines for {len(src)} files (one per file, sorted order)")
    ext = DigitsFeatures()
    # features and logits of each process's shard, gathered in file order: the statistics are then
    # summed in the same order as fd_digits() sums them in one process
    res = _extract(src, ext, args, device, True)
    gen = FeatureStats.from_features(res.features, ext.meta())
    if args.labels:
        labels = [all_labels[i] for i in res.indices]
    else:
        labels = [_label_of(name) for name in res.names]
        labels = None if any(lab is None for lab in labels) else labels
        by_name = _record_labels(src)
        if labels is None and by_name is not None:
            labels = [by_name[name] for name in res.names]
    out = fd_digits_from_stats(gen, res.extra, None if labels is None else torch.tensor(labels),
                               extractor=ext, batch_size=args.batch_size)
    return {
        "value": out["fd"],
        "accuracy": out["accuracy"],
        "gen": {"source": src.description, "n": out["n"], "skipped": [n for n, _ in res.skipped],
                "per_process": res.per_process},
        "ref": {"source": "digits test split", "n": out["n_ref"]},
        "extractor": ext.name,
    }


RUNNERS = {
    "fid": run_fid_kid,
    "kid": run_fid_kid,
    "clip": run_clip,
    "fd-digits": run_fd_digits,
    "stats": run_stats,
}
