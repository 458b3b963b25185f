"""lca_lab: Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch training runs."""

__version__ = "0.1.0"


def track(model, train_data, run_dir, **kwargs):
    """LCA of the optimizer steps of your own training loop: see :func:`lca_lab.integrations.track.track`.

    Imported on first use, so ``import lca_lab`` stays light.
    """
    from .integrations.track import track as _track

    return _track(model, train_data, run_dir, **kwargs)
