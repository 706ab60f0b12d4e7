"""Why the per-case (DP) model loses on the demo's sites: the normalisation, not the rest of the DP form.

Centralized runs without DP on ``make dp-table``'s synthetic sites (run that first), the per-case model with its
normaliser swapped (README, "Privacy: what DP-SGD costs"):

    python -m simulations.norm_probe --sites runs/dp/manifests

``groupnorm``: the DP default (GroupNorm, gcd(32, C) groups); ``one-group``: GroupNorm(1, C); ``none``: no
normalisation; ``groupnorm-lr3x``: the default at 3x the learning rate; ``batchnorm-back``: the per-case form with
its BatchNorm put back (everything else of the DP form kept), which must reproduce the BatchNorm model.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from opacus.validators import ModuleValidator
from torch import nn

from simulations.dp_table import setting_config
from strnet.centralized import run_centralized

_FIX = ModuleValidator.fix.__func__  # type: ignore[attr-defined]


def _no_norm(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    return model


VARIANTS = {
    "groupnorm": (lambda cls, m, **kw: _FIX(cls, m, **kw), []),
    "one-group": (lambda cls, m, **kw: _FIX(cls, m, num_groups=1), []),
    "none": (lambda cls, m, **kw: _no_norm(m), []),
    "groupnorm-lr3x": (lambda cls, m, **kw: _FIX(cls, m, **kw), ["train.lr=0.003"]),
    "batchnorm-back": (lambda cls, m, **kw: copy.deepcopy(m), []),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="runs/dp/manifests", help="make dp-table's per-site manifests")
    parser.add_argument("--out", default="runs/dp/norm-probe")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args(argv)
    manifests = {s: Path(args.sites) / f"{s}.csv" for s in ("stage1", "stage2", "hospital")}
    results = {}
    for name in args.variants:
        fix, extra = VARIANTS[name]
        ModuleValidator.fix = classmethod(fix)  # type: ignore[method-assign]
        try:
            cfg = setting_config(
                ["tracking.enabled=false", *extra],
                manifests,
                Path(args.out) / name,
                ["model.norm=group", "tscore.rounds=0"],
            )
            result = run_centralized(cfg, tracker=None, progress=False)
        finally:
            ModuleValidator.fix = classmethod(_FIX)  # type: ignore[method-assign]
        results[name] = {
            "test_auroc": result.metrics["test_screening_auroc"],
            "val_auroc_by_epoch": [round(h["val_screening_auroc"], 3) for h in result.history],
        }
        print(f"{name:16s} pooled test AUROC {results[name]['test_auroc']:.3f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
