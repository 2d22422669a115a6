"""Weight sparsification inside routed experts: MoE-Pruner, Wanda and magnitude (unstructured or N:M)."""
