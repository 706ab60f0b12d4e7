"""The T-score branch refit: it lowers validation error, keeps the best round, and leaves screening untouched."""

from __future__ import annotations

import torch

from strnet.model import build_strnet
from strnet.tscore import BranchData, branch_keys, branch_sums, local_steps, refit


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
        lambda m, steps: local_steps(m, train, steps, 1e-2, 1e-4),
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
    info = refit(model, lambda m, s: None, lambda m: branch_sums(m, empty), rounds=3, steps_per_round=1)
    assert info["status"].startswith("skipped")
