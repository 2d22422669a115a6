"""Layer-by-layer calibration: forward passes through one materialised decoder layer at a time."""

from grape.calibration.runner import run_layerwise

__all__ = ["run_layerwise"]
