"""LCA inside training loops that are not lca_lab's: :func:`lca_lab.track` (any loop)."""
