"""FD-digits: metric logic with a stand-in classifier, and the bundled classifier when present."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from fewstep.eval.fd_digits import DigitsFeatures, digits_prepare, fd_digits


class StandIn(torch.nn.Module):
    """Small fixed random network with the classifier interface (features + logits)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 6, generator=g), requires_grad=False)
        self.head = torch.nn.Parameter(torch.randn(6, 10, generator=g), requires_grad=False)

    def features(self, x):
        return torch.tanh(x.flatten(1) @ self.w)

    def forward(self, x):
        return self.features(x) @ self.head


def test_prepare_area_average_and_range():
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=g)
    big = small.repeat_interleave(4, -1).repeat_interleave(4, -2).expand(-1, 3, -1, -1)  # nearest x4, RGB
    torch.testing.assert_close(digits_prepare(big), small.float() / 127.5 - 1)
    x = torch.tensor([[[[0, 255], [255, 255]]]], dtype=torch.uint8).repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert digits_prepare(x).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="at least 8x8"):
        digits_prepare(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def test_fd_and_accuracy_against_independent_computation():
    g = torch.Generator().manual_seed(1)
    gen = torch.randint(0, 256, (50, 1, 16, 16), dtype=torch.uint8, generator=g)
    ref = torch.rand(80, 1, 8, 8, generator=g) * 2 - 1
    net = StandIn()
    labels = torch.randint(0, 10, (50,), generator=g)
    res = fd_digits(gen, labels, extractor=DigitsFeatures(net, name="standin"), reference=ref)

    x = torch.nn.functional.avg_pool2d(gen.double(), 2) / 127.5 - 1  # 16 -> 8 area average
    a, b = net.features(x.float()).double().numpy(), net.features(ref).double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    fd = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert res["fd"] == pytest.approx(fd, rel=1e-5)
    acc = (net(x.float()).argmax(1) == labels).float().mean().item()
    assert res["accuracy"] == pytest.approx(acc) and res["n"] == 50 and res["n_ref"] == 80
    with pytest.raises(ValueError, match="labels"):
        fd_digits(gen, labels[:3], extractor=DigitsFeatures(net), reference=ref)


def test_bundled_classifier_and_cli(tmp_path, capsys):
    pytest.importorskip("fewstep.models.classifier")
    from fewstep.apps.cli import main
    from fewstep.eval.fd_digits import digits_reference_images

    imgs, labels = digits_reference_images(32, split="train")
    for i in range(200):
        Image.fromarray(imgs[i, 0].numpy()).save(tmp_path / f"{int(labels[i])}_{i:04d}.png")
    code = main(["eval", "fd-digits", str(tmp_path), "--json", "--no-progress"])
    res = json.loads(capsys.readouterr().out)
    direct = fd_digits(imgs[:200], labels[:200])
    assert code == 0 and res["value"] == pytest.approx(direct["fd"], rel=1e-6)
    assert res["accuracy"] == pytest.approx(direct["accuracy"]) and res["accuracy"] > 0.9  # real digits
