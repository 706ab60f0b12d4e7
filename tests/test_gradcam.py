"""Grad-CAM highlights the region that drives the logit, and leaves the model exactly as it found it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from strnet.errors import DataError
from strnet.gradcam import grad_cam, overlay, save_overlay

H = W = 32


class QuadrantNet(nn.Module):
    """conv -> relu -> conv -> pooled over ONE quadrant -> linear: only that quadrant can move the logit.

    The convolutions are identity-like (centre tap) so activations are spatially aligned with the input.
    """

    def __init__(self, quadrant: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 + 3, 1)
        self.dropout = nn.Dropout(0.5)
        self.quadrant = quadrant
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:, :, 1, 1] = 1.0 / conv.in_channels
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()
        self.gradcam_layer = self.conv2

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.conv2(self.relu(self.conv1(image)))
        qy, qx = self.quadrant
        h, w = a.shape[-2] // 2, a.shape[-1] // 2
        pooled = a[:, :, qy * h : (qy + 1) * h, qx * w : (qx + 1) * w].mean(dim=(2, 3))
        logit = self.head(self.dropout(torch.cat([pooled, tabular], dim=1)))[:, 0]
        return {"screen": logit, "severity": -logit, "t_score": logit * 0}


def _image(quadrant: tuple[int, int]) -> torch.Tensor:
    img = torch.full((1, 1, H, W), 0.1)
    qy, qx = quadrant
    img[:, :, qy * 16 + 4 : qy * 16 + 12, qx * 16 + 4 : qx * 16 + 12] = 1.0
    return img


@pytest.mark.parametrize("quadrant", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_cam_peaks_in_the_quadrant_that_drives_the_logit(quadrant: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = QuadrantNet(quadrant).train()
    tab = torch.zeros(1, 3)
    cam = grad_cam(model, _image(quadrant), tab, layer=model.conv2)
    assert cam.shape == (H, W) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert (y // 16, x // 16) == quadrant
    qy, qx = quadrant
    inside = cam[qy * 16 : (qy + 1) * 16, qx * 16 : (qx + 1) * 16].sum()
    assert inside > 0.9 * cam.sum()
    # model state restored: training mode back, hooks gone, no gradients left on parameters
    assert model.training
    assert len(model.conv2._forward_hooks) == 0
    assert all(p.grad is None for p in model.parameters())


class DarkEvidenceNet(nn.Module):
    """Channel 0 sees the image, channel 1 its inverse; the logit reads only channel 1 (pooled globally).

    Summed activations are flat (x + 1 - x), so only the gradient channel weighting can find the dark patch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.conv1.weight[:, 0, 0, 0] = torch.tensor([1.0, -1.0])
            self.conv1.bias[:] = torch.tensor([0.0, 1.0])
            self.conv2.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
            self.conv2.bias.zero_()

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.conv2(self.relu(self.conv1(image)))
        return {"screen": a[:, 1].mean(dim=(1, 2)) + tabular.sum(dim=1)}


def test_channel_weighting_finds_dark_evidence() -> None:
    img = torch.full((1, 1, H, W), 0.9)
    img[:, :, 20:28, 2:10] = 0.0
    model = DarkEvidenceNet()
    cam = grad_cam(model, img, torch.zeros(1, 3), layer=model.conv2)
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert 20 <= y < 28 and 2 <= x < 10
    assert cam[5, 25] < 0.2


def test_default_layer_and_grad_disabled_context() -> None:
    model = QuadrantNet((1, 0)).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen bundle
    with torch.no_grad():
        cam = grad_cam(model, _image((1, 0)), torch.zeros(1, 3))
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert (y // 16, x // 16) == (1, 0)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # the "severity" head is the negated logit: nothing pushes it up, so the CAM is all zeros
    assert np.all(grad_cam(model, _image((1, 0)), torch.zeros(1, 3), output="severity") == 0)


def test_hooks_removed_and_mode_restored_on_error() -> None:
    model = QuadrantNet((0, 0)).train()
    with pytest.raises(KeyError, match="nope"):
        grad_cam(model, _image((0, 0)), torch.zeros(1, 3), layer=model.conv2, output="nope")
    assert len(model.conv2._forward_hooks) == 0
    assert model.training
    with pytest.raises(ValueError, match=r"\[1, C, H, W\]"):
        grad_cam(model, torch.zeros(2, 1, H, W), torch.zeros(2, 3))


def test_overlay_and_save(tmp_path: Path) -> None:
    gray = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    cam = np.zeros((H, W), np.float32)
    cam[:8, :8] = 1.0
    rgb = overlay(gray, cam)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    # hot CAM -> JET red dominates; cold CAM -> JET blue is blended over the grey
    assert rgb[2, 2, 0] > rgb[2, 2, 2]
    assert rgb[-1, -1, 2] > rgb[-1, -1, 0]
    expected = cv2.addWeighted(
        cv2.cvtColor(cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB),
        0.4,
        np.full((1, 1, 3), round(gray[2, 2] * 255), np.uint8),
        0.6,
        0,
    )
    np.testing.assert_array_equal(rgb[2, 2], expected[0, 0])
    path = save_overlay(tmp_path / "o" / "knee_R_gradcam.png", gray, cam)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    with pytest.raises(ValueError, match="same shape"):
        overlay(gray, cam[:4])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match=r"a_file/knee\.png: could not write"):
        save_overlay(tmp_path / "a_file" / "knee.png", gray, cam)


def test_strnet_tiny_backbone() -> None:
    model_mod = pytest.importorskip("strnet.model")
    torch.manual_seed(0)
    model = model_mod.build_strnet(backbone="tiny").eval()
    image = torch.rand(1, 1, 64, 64)
    for head in ("screen", "severity"):
        cam = grad_cam(model, image, torch.zeros(1, 3), layer=model.gradcam_layer, output=head)
        assert cam.shape == (64, 64) and cam.min() >= 0.0 and cam.max() <= 1.0
    assert len(model.gradcam_layer._forward_hooks) == 0 and not model.training


def test_a_batch_gives_each_image_its_own_cam() -> None:
    """grad_cams in one backward equals grad_cam image by image (eval mode: cases do not mix)."""
    from strnet.gradcam import grad_cams
    from strnet.model import build_strnet

    torch.manual_seed(1)
    model = build_strnet(backbone="tiny").eval()
    images, tabular = torch.rand(5, 1, 64, 64), torch.randn(5, 3)
    batch = grad_cams(model, images, tabular, layer=model.gradcam_layer)
    one_by_one = np.stack([grad_cam(model, images[i : i + 1], tabular[i : i + 1]) for i in range(5)])
    assert batch.shape == (5, 64, 64)
    np.testing.assert_allclose(batch, one_by_one, atol=1e-5)
    assert len(model.gradcam_layer._forward_hooks) == 0
