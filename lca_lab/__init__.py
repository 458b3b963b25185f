"""lca_lab: Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch training runs."""

__version__ = "0.1.0"
