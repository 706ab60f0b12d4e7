from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from strnet import batchnorm


class _Net(nn.Module):
    """Two BatchNorm layers in a row, the second reading what the first normalised (as in a backbone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn1 = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.drop(torch.relu(self.bn1(self.conv(image))))) + tabular.sum()


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "tabular": torch.zeros(3)}


def test_reestimated_statistics_average_each_batch_and_leave_the_model_alone() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(10, 1, 6, 6) * 2 + 3
    stats, n = batchnorm.reestimate(net, _Images(images), batch_size=4)
    assert n == 10 and set(stats) == {f"bn{i}.running_{s}" for i in (1, 2) for s in ("mean", "var")}
    # oracle: the layer-1 input of each batch of 4, 4 and 2 images, its mean and unbiased variance per channel
    with torch.no_grad():
        x = net.conv(images).double()
    batches = [x[0:4], x[4:8], x[8:10]]
    means = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).reshape(2, -1).var(1, unbiased=True) for b in batches]).mean(0)
    np.testing.assert_allclose(stats["bn1.running_mean"], means.numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats["bn1.running_var"], variances.numpy(), rtol=1e-5)
    # layer 2 reads layer 1 normalised by each batch's own statistics, and no dropout
    with torch.no_grad():
        seen = [
            torch.relu(
                nn.functional.batch_norm(
                    b, None, None, net.bn1.weight.double(), net.bn1.bias.double(), training=True, eps=net.bn1.eps
                )
            )
            for b in batches
        ]
    np.testing.assert_allclose(
        stats["bn2.running_mean"], torch.stack([y.mean((0, 2, 3)) for y in seen]).mean(0), rtol=1e-5
    )
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not net.training


def test_pooled_statistics_are_the_moments_of_the_union() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(2.0, 1.0, (300, 3)), rng.normal(-1.0, 3.0, (100, 3))  # sources far apart
    site = [({"l.running_mean": x.mean(0), "l.running_var": x.var(0)}, len(x)) for x in (a, b)]
    pooled = batchnorm.pool([*site, ({"l.running_mean": np.ones(3), "l.running_var": np.ones(3)}, 0)])
    union = np.concatenate([a, b])
    np.testing.assert_allclose(pooled["l.running_mean"], union.mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled["l.running_var"], union.var(0), rtol=1e-6)  # between-source spread included
    assert pooled["l.running_var"].dtype == np.float32


def test_pooling_refuses_sites_that_disagree() -> None:
    one = {"l.running_mean": np.zeros(3), "l.running_var": np.ones(3)}
    with pytest.raises(ValueError, match="different BatchNorm layers"):
        batchnorm.pool([(one, 5), ({"m.running_mean": np.zeros(3), "m.running_var": np.ones(3)}, 5)])
    with pytest.raises(ValueError, match="shape"):
        batchnorm.pool([(one, 5), ({"l.running_mean": np.zeros(4), "l.running_var": np.ones(4)}, 5)])
    with pytest.raises(ValueError, match="no site"):
        batchnorm.pool([(one, 0)])
    with pytest.raises(ValueError, match="no BatchNorm"):
        batchnorm.reestimate(nn.Linear(2, 2), _Images(torch.zeros(2, 1, 4, 4)))
