"""grape: prune Mixture-of-Experts language models (GRAPE, baselines, MoE-Pruner).

``grape.load_pruned(dir)`` loads a pruned (ragged) checkpoint; it is imported on first use so
that ``import grape`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["load_pruned", "__version__"]


def __getattr__(name: str):
    if name == "load_pruned":
        from grape.checkpoint import load_pruned

        return load_pruned
    raise AttributeError(f"module 'grape' has no attribute {name!r}")
