"""``track()``: LCA inside a training loop of your own.

.. code-block:: python

    from lca_lab import track
    with track(model, train_data=train_set, run_dir="runs/c") as lca:
        for x, y in loader:
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            lca.step()                       # after each optimizer step

θ is read when the block is entered (θ_0) and at every ``lca.step()`` (θ_{t+1}); each step's LCA is
computed by the same engine, recorder, reducers and run-file writer as ``python -m lca_lab``
(:class:`~lca_lab.integrations.session.LCASession`), so ``python -m lca_lab.analyze runs/c`` works as for
any run. A block left by an exception keeps every row, with ``status`` ``failed: …``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .session import LCASession


class LCATracker(LCASession):
    """The object ``track()`` yields: call :meth:`step` after every optimizer step."""

    def __enter__(self) -> LCATracker:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exc)


def track(
    model: torch.nn.Module, train_data: Any, run_dir: str | Path, *,
    loss_fn: Callable[..., torch.Tensor] | None = None, lca: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = None, test_data: Any = None, every: int = 1,
    logger: Mapping[str, Any] | None = None, overwrite: bool = False,
) -> LCATracker:  # fmt: skip
    """LCA of the optimizer steps of your own loop, written to ``<run_dir>/lca.h5`` (see the module).

    Args:
        model: the network being trained (its parameters are read, never changed).
        train_data: a torch ``Dataset`` of ``(inputs, target)`` items, or an ``(x, y)`` pair of tensors.
        run_dir: where the run file goes.
        loss_fn: a per-target loss taking ``reduction`` (default ``torch.nn.CrossEntropyLoss``).
        lca: the keys of ``conf/lca``: ``method``, ``tolerance``, ``max_splits``, ``adaptive``,
            ``chunk_size``, ``window``, ``per_class``, ``test``, ``precision``.
        store: ``per_param``, ``trajectory``, ``flush_every`` (the keys of ``store``).
        test_data: held-out data (as ``train_data``): each step's motion scored on it too.
        every: one row per ``every`` optimizer steps.
        logger: a dict of ``conf/logger`` keys (``mode``, ``project``, ``log_every``, …): the LCA series also
            go to a W&B run of lca_lab's own; None: the run file only.
        overwrite: replace a run file already in ``run_dir`` (default: refuse it).
    """
    return LCATracker(
        model, train_data, run_dir, loss_fn=loss_fn, lca=lca, store=store, test_data=test_data, every=every,
        tracker=None if logger is None else dict(logger), overwrite=overwrite, label="track",
    )  # fmt: skip
