"""``LCACallback``: LCA of a PyTorch Lightning fit (``pip install "lca_lab[lightning]"``).

.. code-block:: python

    import lightning as L
    from lca_lab.integrations.lightning import LCACallback

    trainer = L.Trainer(max_epochs=5, callbacks=[LCACallback(train_data=train_set, run_dir="runs/a")])
    trainer.fit(module, train_loader)

then ``python -m lca_lab.analyze runs/a``. One row per optimizer step (``trainer.global_step``), so
``accumulate_grad_batches=k`` gives one row per k batches. What L is (chosen here, see docs/integrations.md):
``loss_fn(module(inputs), targets)`` over the whole ``train_data`` — the LightningModule's ``forward``
gives the logits and ``loss_fn`` (default cross-entropy) is the per-target loss, with the rules of "Your
own model and data". A ``training_step`` cannot serve as L: it mixes the loss with logging, augmentation
and whatever else a step does, and returns a mean over one batch only.

``train_data`` defaults to the dataset of the trainer's training DataLoader (its items as the DataLoader
reads them: a dataset that augments gives an L that changes from pass to pass; give a fixed set then).
Lightning's ``precision`` (e.g. ``"bf16-mixed"``) does not reach L's passes; under DDP the passes are
sharded over the trainer's ranks and rank 0 writes. With a ``WandbLogger`` the series go into its run
(keys ``lca_lab/…``). The callback's state is saved in the trainer's checkpoints: ``trainer.fit(…,
ckpt_path=…)`` continues the run file from the checkpoint's step. A fit that raises keeps every row
(``status`` ``failed: …``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        'lca_lab.integrations.lightning needs PyTorch Lightning: pip install "lca_lab[lightning]"'
    ) from e

from .session import LCASession, check_options


class LCACallback(pl.Callback):
    """LCA of every optimizer step of ``trainer.fit``, written to ``<run_dir>/lca.h5``.

    Args:
        train_data: the examples L is measured on: a ``Dataset`` of ``(inputs, target)`` items or an
            ``(x, y)`` pair of tensors; None: the dataset of the trainer's training DataLoader.
        run_dir: where the run file (and, with ``figures``, the figures and report.md) go.
        loss_fn: the per-target loss, taking ``reduction`` (default ``torch.nn.CrossEntropyLoss``).
        lca, store, test_data, every: as for :func:`lca_lab.track` (the keys of ``conf/lca`` and ``store``).
        logger: None: the trainer's ``WandbLogger`` run when it has one, else no W&B; a dict of
            ``conf/logger`` keys: lca_lab's own W&B run; False: none.
        overwrite: replace a run file already in ``run_dir`` (default: refuse it, naming the fix).
        figures: write the run's figures and report.md when the fit ends.
    """

    def __init__(
        self, train_data: Any = None, run_dir: str | Path = "lca_run", *,
        loss_fn: Callable[..., torch.Tensor] | None = None, lca: Mapping[str, Any] | None = None,
        store: Mapping[str, Any] | None = None, test_data: Any = None, every: int = 1,
        logger: Mapping[str, Any] | bool | None = None, figures: bool = True, overwrite: bool = False,
    ):  # fmt: skip
        self.train_data, self.run_dir, self.logger = train_data, Path(run_dir), logger
        self.options = dict(
            loss_fn=loss_fn, lca=lca, store=store, test_data=test_data, every=every, overwrite=overwrite
        )
        check_options(lca, store, test_data, every)  # before any fit (the data is not read here)
        self.figures = figures
        self.session: LCASession | None = None
        self._resume: dict[str, Any] | None = None
        self._seen = 0  # trainer.global_step at the last row's check

    # -- the fit --------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = self.train_data if self.train_data is not None else _loader_dataset(trainer)
        self.session = LCASession(
            pl_module, data, self.run_dir, tracker=self._tracker(trainer), figures=self.figures,
            label="lightning", **self.options,
        )  # fmt: skip
        self._seen = trainer.global_step
        self.session.open(t=trainer.global_step, resume=self._resume)
        self._resume = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.session is None or trainer.global_step == self._seen:
            return  # a micro-batch of an accumulated step: no optimizer step yet
        self._seen = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.session.step(loss)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close(exception)

    # -- the trainer's checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {} if self.session is None else {"session": self.session.state_dict(), "seen": self._seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("session") or None

    # -- helpers --------------------------------------------------------------------------------------------

    def _tracker(self, trainer: pl.Trainer) -> Any:
        if self.logger is False:
            return None
        if isinstance(self.logger, Mapping):
            return dict(self.logger)
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and trainer.global_rank == 0:
                from ..tracking import WandbTracker

                return WandbTracker.attach(lg.experiment)
        return None


def _loader_dataset(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            "LCACallback could not find the training DataLoader's dataset; pass train_data=… (a Dataset "
            "or an (x, y) pair of tensors)"
        )
    return dataset
