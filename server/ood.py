"""The bundle's out-of-distribution model from pooled statistics: no site sends a feature vector.

Two requests to the training sites, each carrying the kept weights: the sums of neck features and of their outer
products over the training split (the pooled Gaussian, :class:`strnet.ood.FeatureMoments`), then a histogram of
validation distances under that Gaussian (the pooled limit). Centralized training fits the same model through
the same additive pieces (:func:`strnet.ood.fit_ood`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from server.pooled import QuorumError
from server.replies import TrainingSites
from strnet.ood import FeatureGaussian, FeatureMoments, OODModel, default_edges
from strnet.protocol import Field, MessageKind


def pooled_ood(sites: TrainingSites, arrays: ArrayRecord) -> dict[str, Any] | None:
    """The bundle's ``ood`` entry, or None (with the reason reported) when too few sites answered."""
    cfg, problem = sites.cfg, sites.problem
    quorum = cfg.federation.quorum
    config: dict[str, Any] = {}
    moments: list[FeatureMoments] = []
    for site, values in sites.ask(MessageKind.OOD_MOMENTS, config, model=arrays).items():
        try:
            moments.append(FeatureMoments(int(values["n"][0]), values["sum"], values["sum_outer"]))
        except (KeyError, ValueError, IndexError) as exc:
            problem(f"ood moments: site {site}: malformed statistics ({exc})")
    try:
        if len(moments) < quorum:
            raise QuorumError(f"ood moments: {len(moments)} usable site(s), quorum {quorum}")
        gaussian = FeatureGaussian.from_moments(sum(moments[1:], moments[0]))
        sent = ArrayRecord({"mean": Array(gaussian.mean), "covariance": Array(gaussian.covariance)})
        config |= {Field.SHRINKAGE: gaussian.shrinkage, Field.N_CASES: gaussian.n}
        edges = default_edges()
        hists = []
        replies = sites.ask(MessageKind.OOD_DISTANCES, config, stats=sent, model=arrays)
        for site, values in replies.items():
            hist = np.asarray(values.get("hist"))
            if hist.shape != (len(edges) - 1,) or (hist < 0).any():
                problem(f"ood distances: site {site}: malformed histogram {hist.shape}")
                continue
            hists.append(hist)
        if len(hists) < quorum:
            raise QuorumError(f"ood distances: {len(hists)} usable site(s), quorum {quorum}")
        model = OODModel.from_histogram(gaussian, np.sum(hists, axis=0), edges, cfg.ood.quantile, cfg.ood.margin)
    except (QuorumError, ValueError) as exc:
        problem(f"no out-of-distribution model in the bundle: {exc}")
        return None
    return model.to_dict()
