"""Several STR-Nets of one recipe (seeds ``seed``, ``seed + 1``, …) served as one model.

Why: on the real data one run's Mendeley hold-out AUROC is a draw from 0.72–0.88 (three seeds of the ``cpu``
recipe), and validation ranks the seeds differently from the hold-out, so no selection among runs helps. Averaging
the runs does: the three-seed ensemble beat the expected single run on validation in both sources (pooled 0.930
against 0.901 ± 0.030, Mendeley 0.750 against 0.633; docs/real-data.md, "Three seeds").

How the members combine: each member's screening logit is first put on the probability scale by its own Platt
calibration (``a_k · z_k + b_k``, fitted on validation when the member was trained — members trained with
different seeds land at different logit scales), and the ensemble's screening logit is the *mean* of those
calibrated logits. The mean is linear, so averaging a knee with its mirror (``model.test_time_mirror``) gives the
same answer before or after combining, and Grad-CAM of the ensemble logit is the sum of each member's
contribution. On validation it ties the mean of the calibrated probabilities (pooled 0.930 against 0.927). The
ensemble then gets its own Platt calibration and τ* like any model. Severity logits and T-score estimates are
plain means. Out-of-distribution scoring reads the first member's neck: it asks whether an input looks like a
training knee, which one trained network answers, and three members' 384 features would outnumber the few
hundred training knees its Gaussian is fitted on.

The calibrations live in the weights file (a buffer), so the bundle's SHA-256 covers them like every weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from strnet.model import STRNet, build_strnet


class STRNetEnsemble(nn.Module):
    """forward(image, tabular) -> the :class:`STRNet` outputs of the combined model (see the module docstring)."""

    def __init__(self, members: Sequence[STRNet]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two or more members, got {len(members)}")
        self.members = nn.ModuleList(members)
        # row k: member k's Platt (a, b); the identity until the member is calibrated
        self.register_buffer("member_calibration", torch.tensor([[1.0, 0.0]] * len(members)))

    def set_member_calibration(self, k: int, a: float, b: float) -> None:
        self.member_calibration[k] = torch.tensor([a, b], dtype=self.member_calibration.dtype)

    @property
    def gradcam_layer(self) -> tuple[nn.Module, ...]:
        """Every member's last block: :func:`strnet.gradcam.grad_cams` sums their weighted activation maps."""
        return tuple(m.gradcam_layer for m in self.members)

    def forward(
        self, image: torch.Tensor, tabular: torch.Tensor, *, with_features: bool = False
    ) -> dict[str, torch.Tensor]:
        outs = [m(image, tabular, with_features=with_features and k == 0) for k, m in enumerate(self.members)]
        cal = self.member_calibration.float()
        screen = torch.stack([o["screen"].float() for o in outs])  # [K, B]
        out = {
            "screen": (cal[:, :1] * screen + cal[:, 1:]).mean(0),
            "severity": torch.stack([o["severity"].float() for o in outs]).mean(0),
            "t_score": torch.stack([o["t_score"].float() for o in outs]).mean(0),
        }
        return out | {"neck": outs[0]["neck"]} if with_features else out

    def neck_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.members[0].neck_features(image)


def build(*, members: int = 1, **network: object) -> STRNet | STRNetEnsemble:
    """One STR-Net (``members`` 1) or an ensemble of ``members`` of them, each built by
    :func:`strnet.model.build_strnet` with ``network`` (members start alike; their seeds make them differ)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive integer, got {members!r}")
    nets = [build_strnet(**network) for _ in range(members)]  # type: ignore[arg-type]
    return nets[0] if members == 1 else STRNetEnsemble(nets)
