"""Evaluation inputs that used to give silent wrong answers or raw tracebacks (issue 11): image
modes (16-bit, palette, alpha, CMYK, ...), non-finite float images, empty sources, bad statistics
files, corrupt weights and checkpoints, label files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_common import tiny_trunk_file, write_images

from fewstep.eval.features import extract_features
from fewstep.eval.images import BadImagesError, FileImageSource, TensorImageSource, pil_to_rgb_tensor
from fewstep.eval.inception import InceptionFeatures


# ------------------------------------------------------------------------------------------------
# image modes
# ------------------------------------------------------------------------------------------------
def _png(width: int, height: int, color_type: int, bit_depth: int, rows: np.ndarray) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): ``rows`` (H, W*channels) big-endian."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _rgb(arr_hw3: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr_hw3, copy=True)).permute(2, 0, 1)


def _grey(arr_hw: np.ndarray) -> torch.Tensor:
    return _rgb(np.repeat(arr_hw[..., None], 3, axis=2))


def _over_white(c: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Straight alpha composited on white, computed in float64."""
    a = a.astype(np.float64)[..., None] / 255 if c.ndim == 3 else a.astype(np.float64) / 255
    return np.round(c * a + 255 * (1 - a)).astype(np.uint8)


def _write_same_content(folder: Path, grey: np.ndarray, rgb: np.ndarray, sixteen: bool) -> None:
    """Two images of fixed content, as 8-bit or as 16-bit files (value v -> 257 v, exact)."""
    folder.mkdir()
    h, w = grey.shape
    if sixteen:
        Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "a.png")  # I;16
        rows = (rgb.astype(">u2") * 257).reshape(h, w * 3)
        (folder / "b.png").write_bytes(_png(w, h, 2, 16, rows))  # 16-bit RGB
    else:
        Image.fromarray(grey).save(folder / "a.png")
        Image.fromarray(rgb).save(folder / "b.png")


def test_16bit_images_read_as_their_8bit_content(tmp_path):
    """A 16-bit grey PNG was clipped by convert("RGB") to a saturated image (FID 189 against the same
    images in 8 bit); identical content in 8 and 16 bit must read the same and give FID 0."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    _write_same_content(tmp_path / "eight", grey, rgb, sixteen=False)
    _write_same_content(tmp_path / "sixteen", grey, rgb, sixteen=True)
    s8, s16 = FileImageSource(tmp_path / "eight"), FileImageSource(tmp_path / "sixteen")
    for i in range(2):
        torch.testing.assert_close(s16.load(i), s8.load(i), rtol=0, atol=0)
    torch.testing.assert_close(s8.load(0), _grey(grey), rtol=0, atol=0)

    # FID ~ 0 between the two folders (duplicated so that there are 2+ images per side)
    for name in ("eight", "sixteen"):
        for p in list((tmp_path / name).iterdir()):
            (tmp_path / name / f"copy_{p.name}").write_bytes(p.read_bytes())
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    r8 = extract_features(FileImageSource(tmp_path / "eight"), ext, progress=False)
    r16 = extract_features(FileImageSource(tmp_path / "sixteen"), ext, progress=False)
    assert abs(r8.stats.frechet_distance(r16.stats)) < 1e-9


def test_16bit_grey_scales_by_65535_to_255_in_every_container(tmp_path):
    v = np.array([[0, 128, 129, 385, 32767, 32768, 65534, 65535]], dtype=np.uint16)
    expected = _grey(np.round(v / 257.0).astype(np.uint8))
    files = {"le.tif": Image.fromarray(v), "be.tif": Image.fromarray(v.astype(">u2")), "png.png": Image.fromarray(v)}
    for name, im in files.items():
        im.save(tmp_path / name)
    # 16-bit PGM (PIL mode "I", values scaled to 0..65535)
    (tmp_path / "pgm.pgm").write_bytes(b"P5\n8 1\n65535\n" + v.astype(">u2").tobytes())
    src = FileImageSource(tmp_path)
    assert src.names == ["be.tif", "le.tif", "pgm.pgm", "png.png"]
    modes = []
    for i in range(len(src)):
        with Image.open(tmp_path / src.names[i]) as im:
            modes.append(im.mode)
        torch.testing.assert_close(src.load(i), expected, rtol=0, atol=0, msg=src.names[i])
    assert set(modes) >= {"I;16", "I;16B", "I"}


def _alpha_cases():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    return rgb, grey, alpha


def test_alpha_is_composited_on_white_as_a_viewer_shows_it(tmp_path):
    """Transparent pixels were read as whatever colour they hide (alpha dropped); now RGBA, LA and
    palette transparency are composited on white, and an opaque alpha changes nothing."""
    rgb, grey, alpha = _alpha_cases()
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)])).save(tmp_path / "opaque.png")
    src = FileImageSource(tmp_path)
    assert src.names == ["la.png", "opaque.png", "rgba.png"]
    torch.testing.assert_close(src.load(2), _rgb(_over_white(rgb, alpha)), rtol=0, atol=0)
    torch.testing.assert_close(src.load(0), _grey(_over_white(grey, alpha)), rtol=0, atol=0)
    torch.testing.assert_close(src.load(1), _rgb(rgb), rtol=0, atol=0)
    assert src.load(2)[:, 0, 0].tolist() == [255, 255, 255]  # fully transparent: white

    # the same pixels in memory are read the same way
    t = torch.from_numpy(np.dstack([rgb, alpha])).permute(2, 0, 1)[None]
    torch.testing.assert_close(TensorImageSource(t).load(0), src.load(2), rtol=0, atol=0)


def test_palette_with_and_without_transparency(tmp_path):
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 8, (5, 9), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.tobytes())
    im.save(tmp_path / "p.png")
    im.save(tmp_path / "p_transparent.png", transparency=3)
    src = FileImageSource(tmp_path)
    torch.testing.assert_close(src.load(0), _rgb(palette[idx]), rtol=0, atol=0)
    expected = palette[idx].copy()
    expected[idx == 3] = 255
    assert (idx == 3).any()
    torch.testing.assert_close(src.load(1), _rgb(expected), rtol=0, atol=0)


def test_colour_key_transparency_of_grey_and_rgb_pngs(tmp_path):
    """PNG tRNS on an L, RGB or 16-bit grey image marks one value transparent: white, as shown."""
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 4, (5, 6, 3), dtype=np.uint8) * 60
    grey = rng.integers(0, 4, (5, 6), dtype=np.uint8) * 60
    key = tuple(int(v) for v in rgb[1, 1])
    Image.fromarray(rgb).save(tmp_path / "a_rgb.png", transparency=key)
    Image.fromarray(grey).save(tmp_path / "b_grey.png", transparency=int(grey[2, 2]))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "c_grey16.png", transparency=int(grey[2, 2]) * 257)
    src = FileImageSource(tmp_path)
    expected = rgb.copy()
    expected[(rgb == np.array(key)).all(-1)] = 255
    torch.testing.assert_close(src.load(0), _rgb(expected), rtol=0, atol=0)
    g = np.where(grey == grey[2, 2], 255, grey).astype(np.uint8)
    torch.testing.assert_close(src.load(1), _grey(g), rtol=0, atol=0)
    torch.testing.assert_close(src.load(2), _grey(g), rtol=0, atol=0)


def test_other_modes_read_as_seen():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, (4, 5)).astype(bool)
    assert pil_to_rgb_tensor(Image.fromarray(bits)).tolist() == _grey(bits.astype(np.uint8) * 255).tolist()
    cmyk = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    expected = np.round((255 - c) * (255 - k) / 255)  # PIL's CMYK -> RGB (no colour management)
    got = pil_to_rgb_tensor(Image.fromarray(cmyk, "CMYK")).permute(1, 2, 0).numpy()
    assert np.abs(got.astype(float) - expected).max() <= 1
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    for mode in ("YCbCr", "HSV", "LAB"):
        im = Image.fromarray(rgb, "RGB").convert(mode)
        torch.testing.assert_close(pil_to_rgb_tensor(im), _rgb(np.asarray(im.convert("RGB"))), rtol=0, atol=0)
    # premultiplied alpha: composite c_premultiplied + (255 - a)
    a = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    prem = (rgb.astype(np.uint16) * a[..., None] // 255).astype(np.uint8)
    got = pil_to_rgb_tensor(Image.frombytes("RGBa", (5, 4), np.dstack([prem, a]).tobytes()))
    assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - (prem.astype(int) + 255 - a[..., None])).max() == 0


def test_ambiguous_modes_are_refused_by_name_before_any_feature_work(tmp_path):
    """Float images and 32-bit integer TIFFs have no known white level: refused, by file name and
    mode, in the check before the feature pass (skippable like any bad file)."""
    write_images(tmp_path / "imgs", 3, seed=0)
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(tmp_path / "imgs" / "float.tif")
    Image.fromarray(np.arange(12, dtype=np.int32).reshape(3, 4) * 1000).save(tmp_path / "imgs" / "int32.tif")
    src = FileImageSource(tmp_path / "imgs")
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    calls = []
    real = ext.embed
    ext.embed = lambda x: calls.append(1) or real(x)
    with pytest.raises(BadImagesError) as info:
        extract_features(src, ext, progress=False)
    assert calls == []
    msg = str(info.value)
    assert "float.tif" in msg and "mode F" in msg and "int32.tif" in msg and "mode I" in msg
    with pytest.warns(UserWarning, match="skipped 2"):
        assert extract_features(src, ext, progress=False, skip_bad=True).stats.n == 3
    with pytest.raises(ValueError, match="mode F"):
        with Image.open(tmp_path / "imgs" / "float.tif") as im:
            pil_to_rgb_tensor(im)


def test_digits_and_clip_inputs_composite_alpha_too():
    from fewstep.eval.fd_digits import digits_prepare
    from fewstep.eval.preprocess import to_rgb

    rgb, grey, alpha = _alpha_cases()
    t = torch.from_numpy(np.dstack([rgb, alpha])).permute(2, 0, 1)[None]
    expected = _rgb(_over_white(rgb, alpha))[None]
    torch.testing.assert_close(to_rgb(t), expected, rtol=0, atol=0)
    la = torch.from_numpy(np.dstack([grey, alpha])).permute(2, 0, 1)[None]
    torch.testing.assert_close(to_rgb(la), _grey(_over_white(grey, alpha))[None], rtol=0, atol=0)
    big = t.repeat_interleave(8, -1).repeat_interleave(8, -2)
    torch.testing.assert_close(digits_prepare(big), digits_prepare(expected.repeat_interleave(8, -1)
                                                                   .repeat_interleave(8, -2)))


# ------------------------------------------------------------------------------------------------
# non-finite float images
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_images_are_refused_by_index(tmp_path, bad):
    """NaN passed the [0, 1] check (every comparison with NaN is False) and became black pixels:
    a finite FID (609) from NaN images. Now refused, naming the image."""
    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits
    from fewstep.eval.metrics import FID
    from fewstep.eval.preprocess import to_uint8

    x = torch.rand(4, 3, 16, 16)
    x[2, 1, 3, 4] = bad
    with pytest.raises(ValueError, match=r"image 2 .*non-finite"):
        to_uint8(x)
    with pytest.raises(ValueError, match=r"non-finite"):
        to_uint8(x[2])  # a single (C, H, W) image
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    with pytest.raises(ValueError, match="non-finite"):
        ext(x)
    fid = FID(feature=ext)
    with pytest.raises(ValueError, match="non-finite"):
        fid.update(x, real=False)
    from test_eval_fd_digits import StandIn

    with pytest.raises(ValueError, match="image 2 .*non-finite"):
        fd_digits(x, extractor=DigitsFeatures(StandIn(), name="stand-in"))
    with pytest.raises(ValueError, match="image 2 .*non-finite"):
        fd_digits(list(x), extractor=DigitsFeatures(StandIn(), name="stand-in"))


# ------------------------------------------------------------------------------------------------
# empty sources
# ------------------------------------------------------------------------------------------------
def test_empty_sources_are_refused(tmp_path):
    """extract_features returned n = 0 for an empty folder (then FID failed much later, or an
    empty reference was saved); now it says which source is empty, before loading anything."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    with pytest.raises(ValueError, match=r"no images in folder .*empty"):
        extract_features(FileImageSource(tmp_path / "empty"), ext, progress=False)
    with pytest.raises(ValueError, match="no images in tensor"):
        extract_features(TensorImageSource(torch.zeros(0, 3, 8, 8, dtype=torch.uint8)), ext, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"no readable images in folder .*bad: all 1 file\(s\) are bad"):
        extract_features(FileImageSource(tmp_path / "bad"), ext, progress=False, skip_bad=True)


def test_check_images_reports_before_and_its_result_is_reused(tmp_path):
    """check_images (the up-front check that fewstep eval runs on every input before any feature
    pass) lists bad files; extract_features then does not check the same files again."""
    from fewstep.eval.features import check_images

    write_images(tmp_path / "imgs", 3, seed=0)
    (tmp_path / "imgs" / "x.png").write_text("no")
    src = FileImageSource(tmp_path / "imgs")
    with pytest.raises(BadImagesError, match="x.png"):
        check_images(src)
    assert [n for n, _ in check_images(src, skip_bad=True)] == ["x.png"]
    checked = []
    real = FileImageSource.check
    FileImageSource.check = lambda self, i: checked.append(i) or real(self, i)
    try:
        with pytest.warns(UserWarning, match="skipped 1"):
            res = extract_features(src, InceptionFeatures(tiny_trunk_file(tmp_path)), progress=False, skip_bad=True)
    finally:
        FileImageSource.check = real
    assert res.stats.n == 3 and checked == []


# ------------------------------------------------------------------------------------------------
# statistics files
# ------------------------------------------------------------------------------------------------
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_mismatched_or_invalid_statistics_files_name_the_file_and_the_problem(tmp_path):
    from fewstep.eval.frechet import FeatureStats

    good = FeatureStats.from_features(torch.randn(30, 4, dtype=torch.float64), {"extractor": "e", "dim": 4})
    good.save(tmp_path / "good.npz")
    assert FeatureStats.load(tmp_path / "good.npz").n == 30
    cases = {
        "shapes.npz": (dict(mu=np.zeros(2048), sigma=np.eye(10)), r"shapes.npz.*sigma .*\(10, 10\).*2048"),
        "mu2d.npz": (dict(mu=np.zeros((2, 3)), sigma=np.eye(3)), r"mu2d.npz.*mu .*\(2, 3\)"),
        "nan.npz": (dict(mu=np.array([0.0, np.nan]), sigma=np.eye(2)), r"nan.npz.*mu .*non-finite"),
        "asym.npz": (dict(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [-0.5, 1.0]])), r"asym.npz.*not symmetric"),
        "negvar.npz": (dict(mu=np.zeros(2), sigma=-np.eye(2)), r"negvar.npz.*negative variances"),
        "n1.npz": (dict(mu=np.zeros(2), sigma=np.eye(2), n=np.int64(1)), r"n1.npz.*n must be an integer >= 2"),
        "nfloat.npz": (dict(mu=np.zeros(2), sigma=np.eye(2), n=np.float64(2.5)), r"nfloat.npz.*n must be an integer"),
        "meta.npz": (dict(mu=np.zeros(2), sigma=np.eye(2), meta=np.array("{not json")), r"meta.npz.*meta.*JSON"),
        "dim.npz": (dict(mu=np.zeros(2), sigma=np.eye(2), meta=np.array('{"dim": 2048}')), r"dim.npz.*2048.*2"),
        "text.npz": (dict(mu=np.array(["a", "b"]), sigma=np.eye(2)), r"text.npz.*mu .*numbers"),
    }
    for name, (arrays, pattern) in cases.items():
        _npz(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=pattern):
            FeatureStats.load(tmp_path / name)


def test_truncated_or_foreign_statistics_files_say_what_to_do(tmp_path):
    from fewstep.eval.frechet import FeatureStats

    FeatureStats.from_features(torch.randn(30, 64, dtype=torch.float64)).save(tmp_path / "ref.npz")
    data = (tmp_path / "ref.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npz").write_text("hello")
    (tmp_path / "pickled.npz").write_bytes(b"")
    for name in ("cut.npz", "text.npz", "pickled.npz"):
        with pytest.raises(ValueError, match=rf"{name}.*cannot be read.*truncated or not an \.npz.*recompute"):
            FeatureStats.load(tmp_path / name)
    # an .npz whose arrays are object arrays (needs pickle) is not statistics either
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="obj.npz"):
        FeatureStats.load(tmp_path / "obj.npz")


def test_features_of_a_statistics_file_are_checked(tmp_path):
    from fewstep.eval.frechet import FeatureStats, load_stats

    feats = torch.randn(30, 4, dtype=torch.float64)
    st = FeatureStats.from_features(feats, {"extractor": "e"})
    st.save(tmp_path / "with.npz", features=feats)
    st.save(tmp_path / "without.npz")
    s2, f2 = load_stats(tmp_path / "with.npz", need_features=True)
    torch.testing.assert_close(f2.double(), feats) and torch.testing.assert_close(s2.mean, st.mean)
    with pytest.raises(ValueError, match=r"without.npz holds no features.*--keep-features"):
        load_stats(tmp_path / "without.npz", need_features=True)
    np.savez(tmp_path / "wrongdim.npz", mu=np.zeros(4), sigma=np.eye(4), n=np.int64(30), feats=np.zeros((30, 5)))
    with pytest.raises(ValueError, match=r"wrongdim.npz.*feats .*\(30, 5\).*4"):
        load_stats(tmp_path / "wrongdim.npz", need_features=True)


def test_statistics_of_another_extractor_are_refused_naming_the_file(tmp_path):
    from fewstep.eval.frechet import FeatureStats, fid_from_stats

    a = FeatureStats.from_features(torch.randn(30, 4, dtype=torch.float64), {"extractor": "net-a"})
    b = FeatureStats.from_features(torch.randn(30, 4, dtype=torch.float64), {"extractor": "net-b"})
    c = FeatureStats.from_features(torch.randn(30, 6, dtype=torch.float64), {"extractor": "net-a"})
    b.save(tmp_path / "b.npz")
    c.save(tmp_path / "c.npz")
    with pytest.raises(ValueError, match=r"'net-a' vs 'net-b' \(statistics .*b\.npz\)"):
        fid_from_stats(a, FeatureStats.load(tmp_path / "b.npz"))
    with pytest.raises(ValueError, match=r"differ: 4 \(net-a\) vs 6 \(net-a, statistics .*c\.npz\)"):
        fid_from_stats(a, FeatureStats.load(tmp_path / "c.npz"))


# ------------------------------------------------------------------------------------------------
# FD-digits labels
# ------------------------------------------------------------------------------------------------
def test_digit_labels_outside_0_9_are_refused():
    """Labels 10 or -1 were accepted: the accuracy silently counted them as misses."""
    from test_eval_fd_digits import StandIn

    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits

    ext = DigitsFeatures(StandIn(), name="stand-in")
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert fd_digits(x, torch.arange(12) % 10, extractor=ext)["accuracy"] is not None
    for bad, pattern in ((10, r"index 5.* 10\b.*0\.\.9"), (-1, r"index 5.*-1.*0\.\.9")):
        labels = torch.arange(12) % 10
        labels[5] = bad
        with pytest.raises(ValueError, match=pattern):
            fd_digits(x, labels, extractor=ext)
        with pytest.raises(ValueError, match=pattern):
            fd_digits(x, labels.tolist(), extractor=ext)
    with pytest.raises(ValueError, match="integers"):
        fd_digits(x, torch.full((12,), 2.5), extractor=ext)


def test_label_files_name_the_file_and_line(tmp_path):
    from fewstep.eval.fd_digits import read_labels

    p = tmp_path / "labels.txt"
    p.write_text("3\n\n 7 \n0\n")
    assert read_labels(p, 3) == [3, 7, 0]  # blank lines are skipped, spaces stripped
    p.write_text("3\n\nseven\n")
    with pytest.raises(ValueError, match=r"labels.txt, line 3: 'seven' is not an integer"):
        read_labels(p, 2)
    p.write_text("3\n11\n")
    with pytest.raises(ValueError, match=r"labels.txt, line 2: label 11 is outside 0\.\.9"):
        read_labels(p, 2)
    p.write_text("3\n1\n")
    with pytest.raises(ValueError, match=r"labels.txt has 2 labels for 3 images"):
        read_labels(p, 3)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_labels(tmp_path / "nope.txt", 3)
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="labels.txt.*not a UTF-8 text"):
        read_labels(p, 1)


# ------------------------------------------------------------------------------------------------
# corrupt files
# ------------------------------------------------------------------------------------------------
def test_corrupt_inception_weights_name_the_file_and_what_to_do(tmp_path):
    good = tiny_trunk_file(tmp_path)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not weights")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(ValueError, match=rf"{name}.*cannot be loaded.*--inception-weights"):
            InceptionFeatures(tmp_path / name)
    # a TorchScript module that is not an image network
    torch.jit.script(torch.nn.Linear(10, 3)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(ValueError, match=r"linear.pt.*\(1, 3, 299, 299\)"):
        InceptionFeatures(tmp_path / "linear.pt")


def test_corrupt_checkpoint_names_the_file_and_says_to_remove_it(tmp_path):
    write_images(tmp_path / "imgs", 3, seed=0)
    ckpt = tmp_path / "ref.npz.partial"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    with pytest.raises(ValueError, match=r"ref.npz.partial.*cannot be read.*remove it"):
        extract_features(FileImageSource(tmp_path / "imgs"), ext, progress=False, checkpoint=ckpt)


def test_corrupt_zip_source_is_named_as_such(tmp_path):
    import zipfile

    write_images(tmp_path / "imgs", 3, seed=0)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").iterdir()):
            zf.write(p, p.name)
    data = (tmp_path / "imgs.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) - 30])
    with pytest.raises(ValueError, match=r"cut.zip.*not a readable zip archive"):
        FileImageSource(tmp_path / "cut.zip")


def test_image_that_fails_to_decode_is_named_and_the_work_is_kept(tmp_path):
    """A truncated JPEG passes PIL's header check and fails only when decoded, during the pass: it
    is listed by name at the end, and with a checkpoint the finished work is saved first, so the
    rerun with skip_bad=True embeds nothing again."""
    write_images(tmp_path / "imgs", 5, seed=0)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "imgs" / "img_002b.jpg").write_bytes(buf.getvalue()[:1500])  # passes verify(), fails load()
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    ckpt = tmp_path / "ckpt"
    calls = []
    real = ext.embed
    ext.embed = lambda x: calls.append(len(x)) or real(x)
    with pytest.raises(BadImagesError, match=r"(?s)img_002b.jpg.*--skip-bad"):
        extract_features(FileImageSource(tmp_path / "imgs"), ext, batch_size=2, progress=False, checkpoint=ckpt,
                         checkpoint_every=100)
    assert sum(calls) == 5 and ckpt.exists()
    calls.clear()
    with pytest.warns(UserWarning, match="skipped 1"):
        res = extract_features(FileImageSource(tmp_path / "imgs"), ext, batch_size=2, progress=False,
                               checkpoint=ckpt, skip_bad=True)
    assert calls == [] and res.stats.n == 5 and not ckpt.exists()
