"""Moved to :mod:`sweeprun.training.metrics`; this name stays only until sweeprun/sweep.py
imports ``parse_entries`` from there (it does not import torch either way)."""

from .training.metrics import parse_entries, read_metrics

__all__ = ["parse_entries", "read_metrics"]
