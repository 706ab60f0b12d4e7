"""Synthetic knee radiographs and multi-site layouts, so every pipeline stage runs without patient data."""

from __future__ import annotations

from simulations.knee import KneeImage, ScannerProfile, render_knee
from simulations.sites import PROFILES, SITES, sample_patient, write_sites

__all__ = ["PROFILES", "SITES", "KneeImage", "ScannerProfile", "render_knee", "sample_patient", "write_sites"]
