"""Synthetic knee radiographs and multi-site layouts, so every pipeline stage runs without patient data.

The exports load on first use (PEP 562): ``python -m simulations.paper_gpu run`` must import nothing but torch,
torchvision and numpy on a GPU machine, and the synthetic sites need OpenCV and pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KneeImage": "simulations.knee",
    "ScannerProfile": "simulations.knee",
    "render_knee": "simulations.knee",
    "PROFILES": "simulations.sites",
    "SITES": "simulations.sites",
    "sample_patient": "simulations.sites",
    "write_sites": "simulations.sites",
}

__all__ = ["PROFILES", "SITES", "KneeImage", "ScannerProfile", "render_knee", "sample_patient", "write_sites"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'simulations' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
