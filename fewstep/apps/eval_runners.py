"""The metric runners of ``fewstep eval`` (:mod:`fewstep.apps.cmd_eval` parses the arguments).

Each runner takes the parsed arguments, the device, this process's rank and the world size, runs
one metric through :func:`fewstep.eval.features.extract_features` (the one sharded feature pass)
and returns the result dict that ``fewstep eval`` prints. Heavy modules are imported inside.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .options import DIGITS


def _is_npz(spec: str) -> bool:
    from fewstep.eval.frechet import is_stats_file  # *.npz, or statistics saved under another name

    return is_stats_file(spec)


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


def _extract(src, extractor, args, device, keep_features: bool, **kwargs):
    """:func:`fewstep.eval.features.extract_features` with the CLI's options: the one sharded
    feature pass behind every metric (``kwargs``: its checkpoint options)."""
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
        **kwargs,
    )


def _open_side(spec: str, args, extractor, need_features: bool):
    """One side, checked before any feature pass: ``(FeatureStats, features or None)`` of a
    statistics file (its checks, and against ``extractor``), or an image source whose files are
    all checked (:func:`fewstep.eval.features.check_images`) and hold at least 2 usable images."""
    from fewstep.eval.features import check_images

    if _is_npz(spec):
        from fewstep.eval.frechet import load_stats

        st, feats = load_stats(spec, need_features)
        if extractor is not None:
            st.check_extractor(extractor)
        return st, feats
    src = _source(spec, args)
    usable = len(src) - len(check_images(src, skip_bad=args.skip_bad, progress=not args.no_progress))
    if usable < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, {src.description} has {usable}")
    return src


def _side(opened, extractor, args, device, need_features: bool):
    """(FeatureStats, features or None, description, skipped, images per process or None) of one
    side opened by :func:`_open_side`."""
    if isinstance(opened, tuple):
        st, feats = opened
        return st, feats, st.origin, [], None
    res = _extract(opened, extractor, args, device, need_features)
    return res.stats, res.features, opened.description, res.skipped, res.per_process


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
    # every input is checked before the first feature pass (an empty REF failed after GEN's pass)
    gen, ref = [_open_side(spec, args, ext, kid) for spec in (args.gen, args.ref)]
    g_st, g_f, g_desc, g_skip, g_pp = _side(gen, ext, args, device, kid)
    r_st, r_f, r_desc, r_skip, r_pp = _side(ref, ext, args, device, kid)
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
    from fewstep._io import check_writable

    check_writable(args.out, what="OUT")  # before the work, not after it
    ext = _inception(args)
    src = _open_side(args.src, args, ext, args.keep_features)
    if isinstance(src, tuple):
        raise ValueError(f"SRC {args.src} is already a statistics file; give the images (folder, .zip or digits)")
    # long reference passes are resumable: an interrupted run continues from OUT.partial, which is
    # removed only after OUT is complete (written atomically, exactly at OUT, features included)
    res = _extract(src, ext, args, device, args.keep_features, checkpoint=f"{args.out}.partial",
                   keep_checkpoint=True)
    st, desc = res.stats, src.description
    if rank == 0:
        st.meta["source"] = desc
        st.save(args.out, features=res.features)
    res.remove_checkpoint()
    return {
        "value": None,
        "out": args.out,
        "n": st.n,
        "source": desc,
        "skipped": [n for n, _ in res.skipped],
        "per_process": res.per_process,
        "extractor": st.meta.get("extractor"),
        "preprocess": st.meta.get("preprocess"),
    }


def run_clip(args, device, rank, world) -> dict:
    from fewstep.eval.clip_score import CLIPPairScores, CLIPScorer, clip_score_from_pair_scores
    from fewstep.eval.features import check_images
    from fewstep.eval.images import open_image_source

    src = open_image_source(args.gen)
    if args.prompts.lower().endswith(".json"):
        from .._io import read_json

        mapping = read_json(args.prompts, "--prompts")
        if not isinstance(mapping, dict):
            raise ValueError(f"--prompts {args.prompts}: a .json prompts file must hold an object {{file: prompt}}")
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
    check_images(src, skip_bad=args.skip_bad, progress=not args.no_progress)  # before loading CLIP
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

    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits_from_stats, read_labels
    from fewstep.eval.features import check_images
    from fewstep.eval.frechet import FeatureStats
    from fewstep.eval.images import open_image_source

    src = open_image_source(args.gen)
    if args.labels:  # one per file in sorted order; errors name the file and line
        all_labels = read_labels(args.labels, len(src))
    check_images(src, skip_bad=args.skip_bad, progress=not args.no_progress)
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
