"""MultiTaskLoss against hand-masked torch.nn.functional, scikit-learn and scipy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import expit, huber
from sklearn.metrics import log_loss

from strnet.losses import LossWeights, MultiTaskLoss

NAN = float("nan")


def _case() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    outputs = {k: torch.randn(6, generator=g, requires_grad=True) for k in ("screen", "severity", "t_score")}
    batch = {
        "y_screen": torch.tensor([1.0, 0.0, NAN, 1.0, 0.0, 1.0]),
        "y_severity": torch.tensor([0.0, NAN, NAN, 1.0, NAN, 1.0]),
        "t_score": torch.tensor([-1.7, NAN, 0.4, -3.1, NAN, NAN]),
    }
    return outputs, batch


def test_matches_functional_oracles_on_labelled_subsets() -> None:
    outputs, batch = _case()
    loss_fn = MultiTaskLoss(pos_weight=2.5, weights=LossWeights())
    total, parts = loss_fn(outputs, batch, epoch=5)

    scr, sev, ts = [0, 1, 3, 4, 5], [0, 3, 5], [0, 2, 3]  # labelled rows, written out by hand
    o, b = outputs, batch
    exp_screen = F.binary_cross_entropy_with_logits(o["screen"][scr], b["y_screen"][scr], pos_weight=torch.tensor(2.5))
    exp_sev = F.binary_cross_entropy_with_logits(o["severity"][sev], b["y_severity"][sev])
    exp_t = F.smooth_l1_loss(o["t_score"][ts], b["t_score"][ts])
    expected = exp_screen + 0.3 * exp_sev + 0.1 * exp_t

    torch.testing.assert_close(total, expected)
    assert parts["screen"] == pytest.approx(exp_screen.item())
    assert parts["severity"] == pytest.approx(exp_sev.item())
    assert parts["t_score"] == pytest.approx(exp_t.item())
    assert parts["total"] == pytest.approx(expected.item())


def test_library_oracles_sklearn_log_loss_and_scipy_huber() -> None:
    outputs, batch = _case()
    _, parts = MultiTaskLoss(pos_weight=1.0)(outputs, batch, epoch=10)
    sev = [0, 3, 5]
    p = expit(outputs["severity"].detach().numpy()[sev].astype(np.float64))
    assert parts["severity"] == pytest.approx(log_loss(batch["y_severity"].numpy()[sev], p, labels=[0, 1]), rel=1e-5)
    ts = [0, 2, 3]
    resid = outputs["t_score"].detach().numpy()[ts] - batch["t_score"].numpy()[ts]
    assert parts["t_score"] == pytest.approx(float(np.mean(huber(1.0, resid))), rel=1e-5)  # SmoothL1 beta=1 = Huber 1


@pytest.mark.parametrize("per_case", [False, True])
def test_label_smoothing_moves_the_bce_targets_to_eps_halves(per_case: bool) -> None:
    """Smoothed BCE against the cross-entropy written out in numpy: targets ε/2 and 1 − ε/2, positives weighted."""
    eps, w = 0.2, 2.5
    outputs, batch = _case()
    for y in ("y_screen", "y_severity"):  # every case labelled, so the per-case form averages the same cases
        batch[y] = torch.nan_to_num(batch[y], nan=1.0)
    _, parts = MultiTaskLoss(pos_weight=w, weights=LossWeights(label_smoothing=eps), per_case=per_case)(
        outputs, batch, epoch=0
    )
    for key, y_key, weight in (("screen", "y_screen", w), ("severity", "y_severity", 1.0)):
        y = batch[y_key].numpy().astype(np.float64)
        target = y * (1 - eps) + eps / 2
        prob = expit(outputs[key].detach().numpy().astype(np.float64))
        expected = -np.mean(weight * target * np.log(prob) + (1 - target) * np.log(1 - prob))
        assert parts[key] == pytest.approx(expected, rel=1e-5), key
    _, hard = MultiTaskLoss(pos_weight=w, per_case=per_case)(outputs, batch, epoch=0)
    assert parts["screen"] != pytest.approx(hard["screen"])


def test_label_smoothing_out_of_range_is_refused() -> None:
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            LossWeights(label_smoothing=bad)  # type: ignore[arg-type]


def test_t_score_term_switches_on_at_warmup_epoch() -> None:
    outputs, batch = _case()
    loss_fn = MultiTaskLoss(pos_weight=1.0, weights=LossWeights(warmup_epochs=5))
    before, p_before = loss_fn(outputs, batch, epoch=4)
    after, p_after = loss_fn(outputs, batch, epoch=5)
    assert p_before["t_score"] > 0  # still reported for monitoring
    assert before.item() == pytest.approx(p_before["screen"] + 0.3 * p_before["severity"])
    assert (after - before).item() == pytest.approx(0.1 * p_after["t_score"])
    before.backward()
    assert outputs["t_score"].grad is None  # no T-score gradient during warm-up


def test_all_nan_masks_contribute_exact_zero_and_finite_gradients() -> None:
    outputs = {k: torch.randn(4, requires_grad=True) for k in ("screen", "severity", "t_score")}
    batch = {
        "y_screen": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "y_severity": torch.full((4,), NAN),
        "t_score": torch.full((4,), NAN),
    }
    total, parts = MultiTaskLoss(pos_weight=1.0)(outputs, batch, epoch=99)
    assert parts["severity"] == 0.0 and parts["t_score"] == 0.0
    assert total.item() == pytest.approx(parts["screen"])
    total.backward()
    for k in outputs:
        assert outputs[k].grad is not None and torch.isfinite(outputs[k].grad).all()
    assert torch.count_nonzero(outputs["severity"].grad) == 0 and torch.count_nonzero(outputs["t_score"].grad) == 0


def test_batch_without_any_label_gives_zero_with_valid_graph() -> None:
    outputs = {k: torch.randn(3, requires_grad=True) for k in ("screen", "severity", "t_score")}
    batch = {k: torch.full((3,), NAN) for k in ("y_screen", "y_severity", "t_score")}
    total, parts = MultiTaskLoss(pos_weight=2.0)(outputs, batch, epoch=10)
    assert total.item() == 0.0 and not math.isnan(parts["total"])
    assert total.requires_grad
    total.backward()
    assert all(torch.equal(outputs[k].grad, torch.zeros(3)) for k in outputs)


def test_pos_weight_scales_only_the_positive_term() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0])
    pos = {"y_screen": torch.ones(3), "y_severity": torch.full((3,), NAN), "t_score": torch.full((3,), NAN)}
    neg = {**pos, "y_screen": torch.zeros(3)}
    out = {"screen": logits, "severity": torch.zeros(3), "t_score": torch.zeros(3)}
    l1, _ = MultiTaskLoss(pos_weight=1.0)(out, pos, epoch=0)
    l3, _ = MultiTaskLoss(pos_weight=3.0)(out, pos, epoch=0)
    torch.testing.assert_close(l3, 3.0 * l1)
    n1, _ = MultiTaskLoss(pos_weight=1.0)(out, neg, epoch=0)
    n3, _ = MultiTaskLoss(pos_weight=3.0)(out, neg, epoch=0)
    torch.testing.assert_close(n3, n1)


def test_bfloat16_outputs_are_promoted() -> None:
    outputs, batch = _case()
    low = {k: v.detach().to(torch.bfloat16) for k, v in outputs.items()}
    total, _ = MultiTaskLoss(pos_weight=1.0)(low, batch, epoch=10)
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_bad_arguments_raise_clear_errors() -> None:
    outputs, batch = _case()
    with pytest.raises(ValueError, match="pos_weight"):
        MultiTaskLoss(pos_weight=0.0)
    with pytest.raises(ValueError, match="pos_weight"):
        MultiTaskLoss(pos_weight=float("inf"))
    with pytest.raises(ValueError, match="severity"):
        LossWeights(severity=-0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        LossWeights(warmup_epochs=-1)
    loss_fn = MultiTaskLoss(pos_weight=1.0)
    with pytest.raises(KeyError, match="y_severity"):
        loss_fn(outputs, {k: v for k, v in batch.items() if k != "y_severity"}, epoch=0)
    with pytest.raises(ValueError, match="shape"):
        loss_fn(outputs, {**batch, "t_score": torch.zeros(5)}, epoch=0)


@pytest.mark.parametrize("per_case", [False, True])
def test_image_t_score_term_is_its_weighted_masked_smooth_l1_from_the_first_epoch(per_case: bool) -> None:
    """loss.t_score_image adds w·SmoothL1(image-only T-score) over the rows with a T-score, before the warm-up too;
    per case it is averaged over the whole batch like the other terms."""
    outputs, batch = _case()
    outputs["t_score_image"] = torch.randn(6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    plain, _ = MultiTaskLoss(pos_weight=1.0, per_case=per_case)(outputs, batch, epoch=0)
    weighted = MultiTaskLoss(pos_weight=1.0, weights=LossWeights(t_score_image=0.3), per_case=per_case)
    total, parts = weighted(outputs, batch, epoch=0)

    ts = [0, 2, 3]
    term = F.smooth_l1_loss(outputs["t_score_image"][ts], batch["t_score"][ts], reduction="sum")
    expected = term / (6 if per_case else len(ts))
    assert parts["t_score_image"] == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(total, plain + 0.3 * expected)
    total.backward()
    grad = outputs["t_score_image"].grad
    assert grad is not None and torch.all(grad[[1, 4, 5]] == 0) and torch.all(grad[ts] != 0)


def test_image_t_score_weight_without_the_output_is_a_clear_error() -> None:
    outputs, batch = _case()
    with pytest.raises(KeyError, match="t_score_image"):
        MultiTaskLoss(pos_weight=1.0, weights=LossWeights(t_score_image=0.3))(outputs, batch, epoch=0)
    with pytest.raises(ValueError, match="t_score_image"):
        LossWeights(t_score_image=-0.1)


def test_the_bilateral_term_is_the_mean_squared_logit_gap_of_the_knees_drawn_with_their_partner() -> None:
    """loss.bilateral: λ · mean over knees with a partner of (z_knee − z_partner)², gradients into both."""
    outputs, batch = _case()
    has = torch.tensor([True, False, True, False, False, True])
    partner = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    plain, _ = MultiTaskLoss(2.5, LossWeights())(outputs, batch, epoch=5)
    loss_fn = MultiTaskLoss(2.5, LossWeights(bilateral=0.2))
    total, parts = loss_fn(outputs | {"screen_partner": partner}, batch | {"has_partner": has}, epoch=5)
    z = outputs["screen"].detach().numpy()[[0, 2, 5]]
    gap = (z - np.array([0.5, -1.0, 2.0])) ** 2
    assert parts["screen_partner"] == pytest.approx(gap.mean(), rel=1e-6)
    assert float(total) == pytest.approx(float(plain) + 0.2 * gap.mean(), rel=1e-6)
    total.backward()
    np.testing.assert_allclose(partner.grad.numpy(), -2 * 0.2 * (z - [0.5, -1.0, 2.0]) / 3, rtol=1e-5)
    # a batch in which no knee has its partner: the term is an exact 0, still in the graph
    none = torch.zeros(6, dtype=torch.bool)
    total, parts = loss_fn(outputs | {"screen_partner": partner[:0]}, batch | {"has_partner": none}, epoch=5)
    assert parts["screen_partner"] == 0.0 and float(total) == pytest.approx(float(plain), rel=1e-6)
    with pytest.raises(KeyError, match="partner"):
        loss_fn(outputs, batch, epoch=5)
    with pytest.raises(ValueError, match="bilateral"):
        LossWeights(bilateral=-0.1)
