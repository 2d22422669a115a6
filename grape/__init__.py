"""grape: prune Mixture-of-Experts language models (GRAPE, baselines, MoE-Pruner)."""

__version__ = "0.1.0"
