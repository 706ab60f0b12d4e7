"""Averaging a federation's rounds (a weight soup): does it beat the kept round on validation?

A federation keeps its best round by pooled validation AUPRC; neighbouring rounds sit on the same plateau, and
a uniform average of weights along one training trajectory (stochastic weight averaging, a "soup") often ranks
better than any one of them. This reads a run made with ``federation.keep_rounds``, scores every round and a
fixed list of averages on the pooled validation knees, and says which one validation would keep. Test and
external cohorts are reported beside it, never used to choose.

    python -m simulations.round_soup runs/exp/round-soup --manifest runs/real/split.csv \\
        --reference runs/real/centralized/bundle

The averages are fixed before looking: the kept round alone, the ``window`` rounds ending at it, the ``window``
best rounds by validation AUPRC, the last ``window`` rounds, and every round from the first third of the run on.
Floating tensors are averaged; integer ones (BatchNorm's batch counters) come from the latest round averaged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from server.checkpoint import load_rounds
from simulations.paired_difference import paired_auroc_difference
from simulations.seed_ensemble import cohorts, mean_logit
from strnet.bundle import Bundle, load_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.evaluation import predict_frame

State = dict[str, np.ndarray]


def soup(states: list[State]) -> State:
    """The uniform average of ``states`` (floating arrays, in float64 then back to their dtype); integer arrays
    from the last state."""
    out: State = {}
    for key, last in states[-1].items():
        if np.issubdtype(last.dtype, np.floating):
            out[key] = np.mean([s[key].astype(np.float64) for s in states], axis=0).astype(last.dtype)
        else:
            out[key] = last.copy()
    return out


def candidates(val_auprc: dict[int, float], window: int) -> dict[str, list[int]]:
    """The averages compared, as round lists (fixed rules; only the kept round depends on validation)."""
    rounds = sorted(val_auprc)
    kept = max(rounds, key=lambda r: (val_auprc[r], -r))  # the first of equal scores, as the strategy keeps
    by_score = sorted(rounds, key=lambda r: (-val_auprc[r], r))
    return {
        "kept round": [kept],
        f"{window} ending at the kept round": [r for r in rounds if r <= kept][-window:],
        f"{window} best by validation AUPRC": sorted(by_score[:window]),
        f"last {window}": rounds[-window:],
        "all from the first third on": [r for r in rounds if r > len(rounds) // 3],
    }


def score(bundle: Bundle, state: State, frame: pd.DataFrame, cache: PreprocessCache | None) -> np.ndarray:
    """The calibrated logit per knee of ``bundle`` with ``state``'s weights (ranks as the raw logit does)."""
    keys = set(bundle.model.state_dict())
    bundle.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if k in keys})
    return mean_logit([predict_frame(bundle, frame, cache=cache, progress=False)])


def _labels(frame: pd.DataFrame) -> np.ndarray:
    return (frame["label_cls"] != "normal").to_numpy(int)


def evaluate(
    run: Path,
    manifest: Path,
    train_sites: list[str],
    cache: PreprocessCache | None,
    *,
    window: int = 5,
    reference: Path | None = None,
) -> dict:
    """Every round and every candidate on pooled validation, the choice, and the reported cohorts."""
    rounds = load_rounds(run)
    bundle = load_bundle(run / "bundle")
    every = cohorts(read_manifest(manifest), train_sites)
    val = every["val (pooled)"]
    y = _labels(val)
    per_round = {}
    for r, state in rounds.items():
        s = score(bundle, state, val, cache)
        per_round[r] = {"val_auroc": float(roc_auc_score(y, s)), "val_auprc": float(average_precision_score(y, s))}
    souped = {}
    for name, members in candidates({r: v["val_auprc"] for r, v in per_round.items()}, window).items():
        state = soup([rounds[r] for r in members])
        s = score(bundle, state, val, cache)
        souped[name] = {
            "rounds": members,
            "val_auroc": float(roc_auc_score(y, s)),
            "val_auprc": float(average_precision_score(y, s)),
            "state": state,
        }
    chosen = max(souped, key=lambda n: souped[n]["val_auprc"])  # ties: the first listed, the kept round
    reported = []
    ref = load_bundle(reference) if reference is not None else None
    for cohort, part in every.items():
        if cohort.startswith("val "):
            continue
        yc = _labels(part)
        film, _ = pd.factorize(part["path"].str.lower())
        base = mean_logit([predict_frame(ref, part, cache=cache, progress=False)]) if ref is not None else None
        for name, cand in souped.items():
            s = score(bundle, cand["state"], part, cache)
            row = {"cohort": cohort, "candidate": name, "auroc": float(roc_auc_score(yc, s))}
            if base is not None:
                d = paired_auroc_difference(yc, base, s, film)
                row |= {"minus_reference": d["difference"], "ci_lo": d["ci_lo"], "ci_hi": d["ci_hi"]}
            reported.append(row)
    return {
        "rounds": per_round,
        "candidates": {n: {k: v for k, v in c.items() if k != "state"} for n, c in souped.items()},
        "chosen_on_validation": chosen,
        "reported": reported,
    }


def _span(rounds: list[int]) -> str:
    """A round list as printed: consecutive rounds as first-last."""
    if len(rounds) > 1 and rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"{rounds[0]}-{rounds[-1]}"
    return ", ".join(map(str, rounds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a federated run folder written with federation.keep_rounds")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--train-sites", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--reference", type=Path, help="a bundle to report the paired AUROC difference against")
    parser.add_argument("--cache", default=".cache/preprocessed")
    args = parser.parse_args(argv)
    result = evaluate(
        args.run,
        args.manifest,
        args.train_sites,
        PreprocessCache(args.cache),
        window=args.window,
        reference=args.reference,
    )
    (args.run / "round_soup.json").write_text(json.dumps(result, indent=2))
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(pd.DataFrame(result["rounds"]).T.rename_axis("round").to_string())
        table = pd.DataFrame(result["candidates"]).T
        table["rounds"] = [_span(r) for r in table["rounds"]]
        print(table.to_string())
        print(f"chosen on validation: {result['chosen_on_validation']}")
        print(pd.DataFrame(result["reported"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
