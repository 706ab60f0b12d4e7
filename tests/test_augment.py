from __future__ import annotations

import pytest
import torch

from strnet.data.augment import N_DRAWS, Augmenter, AugmentParams, augment_batch

NONE = AugmentParams(hflip_p=0.0, max_rotation_deg=0.0, max_translate=0.0, scale_range=(1.0, 1.0), border_mask_p=0.0)


def _img(h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identity_when_everything_is_off() -> None:
    img = _img()
    out = Augmenter(NONE)(img, _gen(1))
    assert torch.equal(out, img)


def test_flip_mirrors_columns() -> None:
    img = _img()
    out = Augmenter(AugmentParams(**{**NONE.to_dict(), "hflip_p": 1.0}))(img, _gen(1))
    assert torch.equal(out, torch.flip(img, dims=[-1]))


@pytest.mark.parametrize("seed", range(6))
def test_border_masks_are_median_strips_and_interior_untouched(seed: int) -> None:
    h, w, frac = 48, 64, 0.25
    img = _img(h, w, seed=100 + seed)
    median = float(img.median())
    params = AugmentParams(**{**NONE.to_dict(), "border_mask_p": 1.0, "border_mask_max_frac": frac})
    out = Augmenter(params)(img, _gen(seed))

    def strip(lines: torch.Tensor) -> int:
        n = 0
        while n < len(lines) and bool((lines[n] == median).all()):
            n += 1
        return n

    top, bottom = strip(out[0]), strip(out[0].flip(0))
    left, right = strip(out[0].T), strip(out[0].T.flip(0))
    assert max(top, bottom, left, right) >= 1, "at least one border is masked"
    assert max(top, bottom) <= round(frac * h) and max(left, right) <= round(frac * w)
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[:top, :] = False
    keep[h - bottom :, :] = False
    keep[:, :left] = False
    keep[:, w - right :] = False
    assert torch.equal(out[0][keep], img[0][keep])
    assert bool((out[0][~keep] == median).all())


def test_affine_fills_corners_with_median_not_black() -> None:
    img = _img(64, 64, seed=3)
    median = float(img.median())
    params = AugmentParams(**{**NONE.to_dict(), "max_rotation_deg": 45.0})
    for seed in range(20):
        g = _gen(seed)
        angle = (2 * torch.rand(15, generator=_gen(seed), dtype=torch.float64)[1].item() - 1) * 45.0
        out = Augmenter(params)(img, g)
        if abs(angle) > 20:  # the corner then maps outside the source image
            assert out[0, 0, 0].item() == pytest.approx(median, abs=1e-6)
            assert out[0, -1, -1].item() == pytest.approx(median, abs=1e-6)
            return
    pytest.fail("no large rotation drawn in 20 seeds")


def test_default_params_keep_shape_dtype_range_and_change_the_image() -> None:
    img = _img(40, 56)
    out = Augmenter(AugmentParams())(img, _gen(7))
    assert out.shape == img.shape and out.dtype == img.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    outs = [Augmenter(AugmentParams())(img, _gen(s)) for s in range(4)]
    assert any(not torch.equal(o, img) for o in outs)


def test_deterministic_given_generator_and_independent_of_global_rng() -> None:
    img = _img()
    aug = Augmenter(AugmentParams(border_mask_p=1.0))
    torch.manual_seed(0)
    a = aug(img, _gen(5))
    torch.manual_seed(999)
    b = aug(img, _gen(5))
    c = aug(img, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_params_and_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="hflip_p"):
        AugmentParams(hflip_p=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentParams(scale_range=(1.1, 0.9))
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        Augmenter(AugmentParams())(torch.rand(3, 8, 8), _gen(0))
    assert AugmentParams(scale_range=[0.9, 1.1]).scale_range == (0.9, 1.1)  # type: ignore[arg-type]


WIDE = AugmentParams(
    hflip_p=0.5,
    max_rotation_deg=30.0,
    max_translate=0.2,
    scale_range=(0.7, 1.3),
    border_mask_p=0.7,
    border_mask_max_frac=0.3,
)


def _draws(seeds: range) -> torch.Tensor:
    """The uniforms Augmenter draws first from each sample's generator."""
    return torch.stack([torch.rand(N_DRAWS, generator=_gen(s), dtype=torch.float64) for s in seeds])


@pytest.mark.parametrize("params", [AugmentParams(), WIDE, NONE], ids=["recipe", "wide", "off"])
def test_batched_augmentation_equals_the_per_sample_augmenter(params: AugmentParams) -> None:
    n, seeds = 48, range(500, 548)
    images = torch.rand(n, 1, 40, 56, generator=_gen(3))
    images[:16] = (images[:16] * 255).round() / 255  # uint8-like images have many tied values (median)
    expected = torch.stack([Augmenter(params)(images[i], _gen(s)) for i, s in enumerate(seeds)])
    out = augment_batch(images, _draws(seeds), params)
    assert out.shape == images.shape and out.dtype == images.dtype
    # one grid_sample over the batch: the same arithmetic (bitwise on this CPU); cos/sin may differ by an ulp
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_batched_augmentation_covers_every_branch() -> None:
    """The draws above exercise flips, no flips, strips on each border and the 'no border picked' rule."""
    u = _draws(range(500, 548))
    assert (u[:, 0] < 0.5).any() and (u[:, 0] >= 0.5).any()
    masked = u[:, 5] < WIDE.border_mask_p
    assert masked.any() and (~masked).any()
    assert ((u[:, 6:10] >= 0.5).all(1) & masked).any()  # no border picked: the smallest pick is used


def test_batched_augmentation_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        augment_batch(torch.rand(2, 3, 8, 8), torch.rand(2, N_DRAWS), AugmentParams())
    with pytest.raises(ValueError, match="draws"):
        augment_batch(torch.rand(2, 1, 8, 8), torch.rand(3, N_DRAWS), AugmentParams())
