"""The T-score branch refit as FedAvg over the branch's weights (:mod:`strnet.tscore`), with pooled validation.

Each round the server sends the current branch; every training site replies its validation sums for that
branch and, if it has reference T-scores, the branch after the same full-batch steps centralized training runs;
the branch is averaged weighted by those sites' T-score cases. Validation error is pooled from additive sums,
and only the last round's branch needs a validation message of its own. The first request carries the whole
kept model (the sites cache the frozen branch inputs); later ones carry the branch only (~14 k numbers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from configs.schema import build_model
from server.pooled import QuorumError, weighted_average
from server.replies import TrainingSites
from strnet.npy import arrays_numpy
from strnet.protocol import WEIGHT, Field, MessageKind
from strnet.tscore import DP_OFF, SUM_KEYS, branch_keys, refit


def pooled_tscore_refit(sites: TrainingSites, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
    """The kept weights with the refitted branch, and what the refit did (for the bundle)."""
    cfg, problem = sites.cfg, sites.problem
    ts = cfg.tscore
    if not ts.rounds:
        return arrays, {"status": "off"}
    if cfg.privacy.dp.enabled:
        return arrays, {"status": DP_OFF}
    model = build_model(cfg, weights="none")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays_numpy(arrays).items()})
    keys = branch_keys(model)
    config: dict[str, Any] = {}

    def branch() -> dict[str, ArrayRecord]:
        """The first message is about the whole kept model with the branch as the refit starts it (shipped once,
        server.replies.ModelShipping; named by its digest in every later message); later ones carry the current
        branch. The start is not the kept model's own branch when the image path is off (its adapter zeroed):
        sending the kept model there let every site train the adapter it had, so an `off` refit read the image."""
        state = model.state_dict()
        current = {k: Array(state[k].detach().cpu().numpy()) for k in keys}
        if Field.MODEL_DIGEST not in config:
            whole = ArrayRecord({k: current.get(k, v) for k, v in arrays.items()})
            config[Field.MODEL_DIGEST] = sites.shipping.digest(whole)
            return {"model": whole}
        return {"arrays": ArrayRecord(current)}

    def pooled(replies: dict[str, dict[str, Any]], what: str) -> np.ndarray:
        sums = [np.asarray(v.pop("sums", ())) for v in replies.values()]
        good = [s for s in sums if s.shape == (len(SUM_KEYS),) and np.isfinite(s).all()]
        if len(good) < cfg.federation.quorum:
            raise QuorumError(f"T-score refit {what}: {len(good)} usable site(s)")
        return np.sum(good, axis=0)

    def validation(_: torch.nn.Module) -> np.ndarray:
        payload = branch()  # first: it names the model the later messages' config carries
        return pooled(sites.ask(MessageKind.TSCORE_VAL, dict(config), **payload), "validation")

    def step(_: torch.nn.Module, steps: int) -> np.ndarray:
        """Every site's validation sums of the sent branch and its branch after ``steps`` steps, in one exchange."""
        payload = branch()
        replies = sites.ask(MessageKind.TSCORE_TRAIN, config | {Field.STEPS: steps}, **payload, partial=True)
        sums = pooled(replies, "validation")
        states, weights = [], []
        for site, values in replies.items():
            n = float(np.asarray(values.pop(WEIGHT, [0]))[0])
            if n <= 0:
                continue  # a site without T-scores trains nothing and weighs nothing
            if set(values) != set(keys):
                problem(f"T-score refit: site {site} replied {len(values)} tensors, expected {len(keys)}")
                continue
            states.append(values)
            weights.append(n)
        if not states:
            raise QuorumError("T-score refit: no site with T-scores replied")
        averaged = weighted_average(states, weights)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in averaged.items()}, strict=False)
        return sums

    try:
        info = refit(model, step, validation, **ts.schedule())
    except QuorumError as exc:
        problem(f"T-score branch not refitted: {exc}")
        return arrays, {"status": f"failed: {exc}"}
    state = model.state_dict()
    refitted = ArrayRecord({k: (Array(state[k].detach().cpu().numpy()) if k in keys else v) for k, v in arrays.items()})
    return refitted, info | {"fitted_on": "FedAvg of the branch over sites with T-scores, pooled validation MSE"}
