"""The T-score branch refit: it lowers validation error, keeps the best round, and leaves screening untouched."""

from __future__ import annotations

import pytest
import torch

from strnet.model import build_strnet
from strnet.tscore import (
    BranchData,
    branch_keys,
    branch_sums,
    image_path_note,
    local_steps,
    refit,
    validate_then_train,
)


def _data(seed: int, n: int, dim: int) -> BranchData:
    g = torch.Generator().manual_seed(seed)
    tabular = torch.randn(n, 3, generator=g)
    routed = torch.relu(torch.randn(n, dim, generator=g))
    target = -1.5 - 0.9 * tabular[:, 0] + 0.3 * tabular[:, 2] + 0.2 * torch.randn(n, generator=g)
    return BranchData(routed, tabular, target)


def test_refit_lowers_validation_error_and_touches_only_the_branch() -> None:
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny", neck_dim=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = _data(1, 80, 32), _data(2, 40, 32)
    info = refit(
        model,
        lambda m, steps: validate_then_train(m, train, val, steps, 1e-2, 1e-4),
        lambda m: branch_sums(m, val),
        rounds=20,
        steps_per_round=10,
    )
    assert info["status"] == "refitted" and info["val_mse"] < 0.5 * info["val_mse_before"]
    assert info["val_mse"] == min(info["val_mse_history"])  # the best round is the one kept
    sums = branch_sums(model, val)
    assert abs(sums[1] / sums[0] - info["val_mse"]) < 1e-9
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= set(branch_keys(model))
    image, tabular = torch.rand(2, 1, 32, 32), torch.zeros(2, 3)
    fresh = build_strnet(backbone="tiny", neck_dim=32)
    fresh.load_state_dict(before)
    model.eval(), fresh.eval()
    torch.testing.assert_close(model(image, tabular)["screen"], fresh(image, tabular)["screen"])


def test_refit_without_validation_t_scores_is_skipped() -> None:
    model = build_strnet(backbone="tiny", neck_dim=32)
    empty = BranchData(torch.zeros(0, 32), torch.zeros(0, 3), torch.zeros(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = _data(1, 20, 32)
    info = refit(
        model,
        lambda m, s: validate_then_train(m, train, empty, s, 1e-2, 0.0),
        lambda m: branch_sums(m, empty),
        rounds=3,
        steps_per_round=1,
    )
    assert info["status"].startswith("skipped")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the step the validation rode on is undone


def test_patience_stops_the_refit_where_the_full_run_had_no_better_round() -> None:
    train, val = _data(1, 60, 32), _data(3, 30, 32)
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny", neck_dim=32)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step(m: torch.nn.Module, steps: int):  # type: ignore[no-untyped-def]
        return validate_then_train(m, train, val, steps, 5e-2, 0.0)  # a large step: it overfits and stalls

    full = refit(model, step, lambda m: branch_sums(m, val), rounds=40, steps_per_round=20)
    model.load_state_dict(start)
    early = refit(model, step, lambda m: branch_sums(m, val), rounds=40, steps_per_round=20, patience=3)
    h = full["val_mse_history"]
    stop = next(r for r in range(1, len(h)) if r - min(range(r + 1), key=h.__getitem__) >= 3)
    assert early["rounds_run"] == stop < full["rounds_run"]  # the fixture has to stall, or this tests nothing
    assert early["val_mse_history"] == h[: stop + 1]
    assert early["kept_round"] == min(range(stop + 1), key=h.__getitem__)
    assert branch_sums(model, val)[1] / branch_sums(model, val)[0] == pytest.approx(early["val_mse"])


def test_fused_rounds_give_the_history_of_separate_validation_and_training() -> None:
    """Validating round r's branch in round r + 1's training exchange changes the messages, not the numbers."""
    train, val = _data(1, 60, 32), _data(2, 30, 32)
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny", neck_dim=32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[str] = []

    def step(m: torch.nn.Module, steps: int):  # type: ignore[no-untyped-def]
        calls.append("step")
        return validate_then_train(m, train, val, steps, 1e-2, 1e-4)

    def validation(m: torch.nn.Module):  # type: ignore[no-untyped-def]
        calls.append("validation")
        return branch_sums(m, val)

    info = refit(model, step, validation, rounds=6, steps_per_round=5)
    assert calls == ["step"] * 6 + ["validation"]  # 7 exchanges, where validate-then-train-separately made 13

    model.load_state_dict(start)  # the plain loop, written out: validate, then train and validate each round
    history = [branch_sums(model, val)]
    for _ in range(6):
        local_steps(model, train, 5, 1e-2, 1e-4)
        history.append(branch_sums(model, val))
    mse = [float(h[1] / h[0]) for h in history]
    assert info["val_mse_history"] == mse and info["kept_round"] == mse.index(min(mse))


def _leaky(seed: int, n: int, dim: int, *, image_carries_target: bool) -> BranchData:
    """Covariates carry the T-score; the image features carry it too only where ``image_carries_target``
    (training knees whose features the backbone memorised), else they are noise."""
    data = _data(seed, n, dim)
    if image_carries_target:
        g = torch.Generator().manual_seed(seed + 100)
        data.routed[:, :4] = torch.relu(-data.target[:, None] + 0.05 * torch.randn(n, 4, generator=g))
    return data


def _fit(image: str, train: BranchData, val: BranchData) -> tuple[dict, torch.nn.Module]:  # type: ignore[type-arg]
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny", neck_dim=32)
    info = refit(
        model,
        lambda m, steps: validate_then_train(m, train, val, steps, 1e-2, 1e-4),
        lambda m: branch_sums(m, val),
        rounds=15,
        steps_per_round=10,
        image=image,
    )
    return info, model


def test_image_path_off_stays_off_and_ignores_the_image() -> None:
    train, val = _data(1, 60, 32), _data(2, 30, 32)
    info, model = _fit("off", train, val)
    assert info["image_path"] == "off"
    assert all(torch.count_nonzero(p) == 0 for p in model.t_image.parameters())
    noise = BranchData(torch.rand_like(val.routed) * 5, val.tabular, val.target)
    torch.testing.assert_close(branch_sums(model, noise), branch_sums(model, val), rtol=0, atol=0)


@pytest.mark.parametrize(("memorised", "expected"), [(True, "off"), (False, "on")])
def test_auto_keeps_the_fit_with_the_lower_validation_error(memorised: bool, expected: str) -> None:
    """Features that fit the training knees only lose on validation; features that carry the T-score on new
    knees too win."""
    train = _leaky(1, 60, 32, image_carries_target=True)
    val = _leaky(2, 40, 32, image_carries_target=not memorised)
    on, _ = _fit("on", train, val)
    off, _ = _fit("off", train, val)
    auto, model = _fit("auto", train, val)
    assert auto["val_mse_image_on"] == on["val_mse"] and auto["val_mse_image_off"] == off["val_mse"]
    assert auto["image_path"] == ("on" if on["val_mse"] <= off["val_mse"] else "off") == expected
    assert branch_sums(model, val)[1] / branch_sums(model, val)[0] == pytest.approx(auto["val_mse"])


def test_unknown_image_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="image="):
        _fit("maybe", _data(1, 10, 32), _data(2, 10, 32))


def test_reports_say_when_the_t_score_estimate_does_not_read_the_image() -> None:
    def fit(path: str) -> dict:  # type: ignore[type-arg]
        return {"tscore_refit": {"status": "refitted", "image_path": path}}

    assert image_path_note(fit("on")) == "" and image_path_note({}) == ""
    assert image_path_note(fit("off")).startswith("The T-score estimate reads age, sex and BMI only")
    mixed = fit("on") | {"members": [fit("on"), fit("off"), fit("on")]}  # the run's own record is member 1's
    assert "mean of 3 networks' estimates; 1 of them read age, sex and BMI only" in image_path_note(mixed)
