"""``LCATrainerCallback``: LCA of a Hugging Face ``Trainer`` run (``pip install "lca_lab[hf]"``).

.. code-block:: python

    from transformers import Trainer
    from lca_lab.integrations.hf import LCATrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[LCATrainerCallback(train_data=ds, run_dir="runs/b")])
    trainer.train()

then ``python -m lca_lab.analyze runs/b``. One row per optimizer step (``on_step_end``), so
``gradient_accumulation_steps=k`` gives one row per k micro-batches.

**L is the model's own loss** over the whole ``train_data`` (default: the trainer's ``train_dataset``):
its items are dicts of model inputs with labels under ``args.label_names`` (default ``labels``), as the
Trainer feeds them. L is the cross-entropy of the model's logits against those labels, per counted target,
the way the model computes its own loss: a causal language model (a class of transformers'
``MODEL_FOR_CAUSAL_LM_MAPPING``, or ``shift_labels=True``) predicts token t+1 from tokens ≤ t, so its
labels are shifted by one and ``-100`` is not counted; a classifier's labels are one class per example.
The mean is over every counted target of the set (tokens for a language model). Items must stack (pad
them to one length: ``tokenizer(..., padding="max_length", max_length=…)``).

Mixed precision (``bf16=True``, ``fp16=True``) does not reach L's passes. Under ``torchrun`` /
``accelerate launch`` the passes are sharded over the ranks and rank 0 writes. With ``report_to="wandb"``
the series go into the Trainer's W&B run (keys ``lca_lab/…``). Each checkpoint the Trainer saves holds
the callback's state (``lca_lab_state.pt``); ``trainer.train(resume_from_checkpoint=…)`` continues the run
file from it. A run that ends on an exception keeps every row, with ``status`` ``failed: …`` (the Trainer
has no exception hook: the callback closes the file from ``sys.excepthook`` when the exception ends the
process, or on the next ``train()``; call :meth:`LCATrainerCallback.close` to close it yourself).
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError('lca_lab.integrations.hf needs transformers: pip install "lca_lab[hf]"') from e

from .session import LCASession, check_options

STATE_FILE = "lca_lab_state.pt"


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal language models (labels shifted by one token)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class ModelItems(Dataset):
    """A Trainer's dataset (dict items with labels) as lca_lab's ``(inputs, target)`` items.

    ``inputs``: the item's tensors but the labels (those the model's ``forward`` takes, when
    ``accepted`` names them); ``target``: the labels, shifted by one with ``-100`` at the end when
    ``shift`` (a causal language model's own loss)."""

    def __init__(self, data: Any, label: str, shift: bool, accepted: Sequence[str] | None = None):
        self.data, self.label, self.shift = data, label, shift
        self.accepted = None if accepted is None else set(accepted)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        item = self.data[i]
        if not isinstance(item, Mapping) or self.label not in item:
            raise ValueError(
                f"item {i} of the training data is not a dict with {self.label!r}; LCATrainerCallback "
                "needs the Trainer's items (dicts of model inputs and labels), or set args.label_names"
            )
        inputs = {
            k: torch.as_tensor(v) for k, v in item.items()
            if k != self.label and (self.accepted is None or k in self.accepted)
        }  # fmt: skip
        y = torch.as_tensor(item[self.label])
        if self.shift:
            y = torch.cat([y[1:], torch.full_like(y[:1], -100)])
        return inputs, y


def _accepted(model: torch.nn.Module) -> list[str] | None:
    import inspect

    params = inspect.signature(model.forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return list(params)


class LCATrainerCallback(TrainerCallback):
    """LCA of every optimizer step of ``Trainer.train``, written to ``<run_dir>/lca.h5``.

    Args:
        train_data: the examples L is measured on (the Trainer's dict items); None: ``train_dataset``.
        run_dir: where the run file (and, with ``figures``, the figures and report.md) go.
        shift_labels: None: shifted for a causal LM (:func:`is_causal_lm`), else not; or True / False.
        loss_fn: the per-target loss on the logits, taking ``reduction`` (default cross-entropy, as the
            models' own losses).
        lca, store, test_data, every: as for :func:`lca_lab.track`.
        logger: None: the Trainer's W&B run with ``report_to`` wandb, else no W&B; a dict of
            ``conf/logger`` keys: lca_lab's own W&B run; False: none.
        overwrite: replace a run file already in ``run_dir`` (default: refuse it, naming the fix).
        figures: write the run's figures and report.md when training ends.
    """

    def __init__(
        self, train_data: Any = None, run_dir: str | Path = "lca_run", *, shift_labels: bool | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None, lca: Mapping[str, Any] | None = None,
        store: Mapping[str, Any] | None = None, test_data: Any = None, every: int = 1,
        logger: Mapping[str, Any] | bool | None = None, figures: bool = True, overwrite: bool = False,
    ):  # fmt: skip
        self.train_data, self.run_dir, self.shift_labels = train_data, Path(run_dir), shift_labels
        self.logger, self.figures = logger, figures
        self.options = dict(loss_fn=loss_fn, lca=lca, store=store, every=every, overwrite=overwrite)
        self.test_data = test_data
        check_options(lca, store, test_data, every)  # before any training (the data is not read here)
        self.session: LCASession | None = None
        self._hook = None

    # -- the Trainer's events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.session is not None:  # the last train() raised and was caught
            self.close(RuntimeError("train() ended on an exception before on_train_end"))
        label = (list(args.label_names or []) or ["labels"])[0]
        shift = is_causal_lm(model) if self.shift_labels is None else bool(self.shift_labels)
        accepted = _accepted(model)

        def items(data: Any) -> ModelItems | None:
            return None if data is None else ModelItems(data, label, shift, accepted)

        data = self.train_data
        if data is None:
            data = getattr(train_dataloader, "dataset", None)
            if data is None:
                raise ValueError("LCATrainerCallback found no train_dataset; pass train_data=…")
        self.session = LCASession(
            model, items(data), self.run_dir, test_data=items(self.test_data), tracker=self._tracker(args),
            figures=self.figures, label="hf", **self.options,
        )  # fmt: skip
        resume = self._saved_state(args, state)
        self.session.open(t=state.global_step, resume=resume)
        self._catch_exits()

    def on_step_end(self, args, state, control, **kwargs):
        if self.session is not None:
            self.session.step()

    def on_save(self, args, state, control, **kwargs):
        if self.session is None:
            return
        saved = self.session.state_dict()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(saved, folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self, exc: BaseException | None = None) -> None:
        """Close the run file: ``status`` complete, or ``failed: …`` for ``exc``. Idempotent."""
        session, self.session = self.session, None
        self._release_exits()
        if session is not None:
            session.close(exc)

    # -- helpers --------------------------------------------------------------------------------------------

    def _saved_state(self, args, state) -> dict[str, Any] | None:
        """The state saved with the checkpoint a resumed Trainer starts from (global_step > 0)."""
        if state.global_step == 0:
            return None
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"the Trainer resumes at step {state.global_step} but {path} is missing: resume from a "
                "checkpoint saved with LCATrainerCallback, or give this run another run_dir"
            )
        return torch.load(path, map_location="cpu", weights_only=True)

    def _tracker(self, args) -> Any:
        if self.logger is False:
            return None
        if isinstance(self.logger, Mapping):
            return dict(self.logger)
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                from ..tracking import WandbTracker

                return WandbTracker.attach(wandb.run)
        return None

    def _catch_exits(self) -> None:
        """The Trainer calls no callback when train() raises: close the file from ``sys.excepthook`` when
        the exception ends the process, and at exit otherwise."""
        previous = sys.excepthook

        def hook(tp, value, tb):
            self.close(value)
            previous(tp, value, tb)

        def at_exit():
            self.close(RuntimeError("the process exited before the Trainer's on_train_end"))

        sys.excepthook, self._hook = hook, (previous, hook, at_exit)
        atexit.register(at_exit)

    def _release_exits(self) -> None:
        if self._hook is None:
            return
        previous, hook, at_exit = self._hook
        self._hook = None
        if sys.excepthook is hook:
            sys.excepthook = previous
        atexit.unregister(at_exit)
