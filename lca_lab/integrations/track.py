"""``track()``: LCA inside a training loop of your own.

.. code-block:: python

    from lca_lab import track
    with track(model, train_data=train_set, run_dir="runs/c") as lca:
        for x, y in loader:
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            lca.step()                       # after each optimizer step

θ is read when the block is entered (θ_0) and at every ``lca.step()`` (θ_{t+1}); each step's LCA is
computed by the same engine, recorder, reducers and run-file writer as ``python -m lca_lab``, so
``python -m lca_lab.analyze runs/c`` works as for any run. L is the loss over the whole ``train_data``
(the rules of "Your own model and data": dict inputs, per-token targets, ``-100``), evaluated with every
module in eval mode but BatchNorm. A block left by an exception keeps every row, with ``status``
``failed: …``.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from .. import __version__
from ..examples import tree_map
from ..lca import FullBatchLoss, LayerSums, LCAEngine, auto_chunk_size, check_engine_options
from ..loop import LCADriver, StepRecorder
from ..nets import entry_layer_index, layer_groups, param_layer_index
from ..parts import build_loss
from ..reducers import LCAReducer
from ..splits import bundle_from
from ..store import RunWriter

LCA_DEFAULTS = {"method": "rk4", "tolerance": 1e-3, "max_splits": 32, "adaptive": True, "chunk_size": "auto",
                "window": None}  # fmt: skip
STORE_DEFAULTS = {"per_param": True, "trajectory": False, "flush_every": 50}


class _Pair(Dataset):
    """An ``(inputs, targets)`` pair as a Dataset: inputs a tensor, tuple or dict of tensors ``[N, ...]``;
    lca_lab reads the whole tensors (``inputs`` / ``targets``) without going item by item."""

    def __init__(self, inputs: Any, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        return tree_map(lambda t: t[i], self.inputs), self.targets[i]


def _as_dataset(train_data: Any) -> Any:
    """A Dataset (or a data target's mapping) as given; an ``(x, y)`` pair of tensors as a Dataset."""
    if isinstance(train_data, (Dataset, Mapping)):
        return train_data
    if (
        isinstance(train_data, (tuple, list))
        and len(train_data) == 2
        and isinstance(train_data[1], torch.Tensor)
    ):
        return _Pair(*train_data)
    raise TypeError(
        f"train_data must be a torch Dataset or an (x, y) pair of tensors, got {type(train_data).__name__}"
    )


class LCATracker:
    """The object ``track()`` yields: call :meth:`step` after every optimizer step."""

    def __init__(
        self, model: torch.nn.Module, train_data: Any, run_dir: str | Path, *,
        loss_fn: Callable[..., torch.Tensor] | None = None, lca: Mapping[str, Any] | None = None,
        store: Mapping[str, Any] | None = None,
    ):  # fmt: skip
        unknown = set(lca or {}) - set(LCA_DEFAULTS)
        if unknown:
            raise ValueError(f"lca keys {sorted(unknown)} are unknown; valid: {', '.join(LCA_DEFAULTS)}")
        unknown = set(store or {}) - set(STORE_DEFAULTS)
        if unknown:
            raise ValueError(f"store keys {sorted(unknown)} are unknown; valid: {', '.join(STORE_DEFAULTS)}")
        self.lca, self.store = {**LCA_DEFAULTS, **(lca or {})}, {**STORE_DEFAULTS, **(store or {})}
        check_engine_options(self.lca["method"], float(self.lca["tolerance"]), int(self.lca["max_splits"]))
        self.model, self.run_dir = model, Path(run_dir)
        self.device = next(model.parameters()).device
        self.loss_fn = loss_fn or build_loss(None)
        self.data = bundle_from(_as_dataset(train_data), "track.train_data", self.device)
        self.t = self.rows = 0
        self._driver: LCADriver | None = None

    # -- the block ------------------------------------------------------------------------------------------

    def __enter__(self) -> LCATracker:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model, ex = self.model, self.data.train
        groups = layer_groups(model)
        named = dict(model.named_parameters())
        self.pnames = [n for n, p in named.items() if p.requires_grad]
        index = entry_layer_index(model).to(self.device)
        chunk = self.lca["chunk_size"]
        chunk = auto_chunk_size(model, len(ex), self.device, ex.head(4)) if chunk == "auto" else int(chunk)
        fbl = FullBatchLoss(model, ex, None, chunk, loss_fn=self.loss_fn, param_names=self.pnames)
        engine = LCAEngine(
            fbl, self.lca["method"], float(self.lca["tolerance"]), int(self.lca["max_splits"]),
            bool(self.lca["adaptive"]), layer_sums=LayerSums(index, len(groups)),
        )  # fmt: skip
        self.layer_names = [g[0] for g in groups]
        self.writer = RunWriter(
            self.run_dir / "lca.h5", param_names=self.pnames,
            param_shapes=[tuple(named[n].shape) for n in self.pnames], param_layer=param_layer_index(model),
            layer_names=self.layer_names, attrs=self._attrs(chunk), per_param=bool(self.store["per_param"]),
            trajectory=bool(self.store["trajectory"]), flush_every=int(self.store["flush_every"]),
        )  # fmt: skip
        self.writer.__enter__()
        reducer = LCAReducer(index, len(groups), engine.layer_sums)
        self.recorder = StepRecorder(
            reducer, self.writer, per_param=bool(self.store["per_param"]),
            trajectory=bool(self.store["trajectory"]), layer_names=self.layer_names, divergence_hint=None,
        )  # fmt: skip
        window = self.lca["window"]
        lo, hi = (0, float("inf")) if window is None else (int(window[0]), int(window[1]))
        self._window = (lo, hi)
        self._driver = LCADriver(engine, self.recorder, self._flat, (lo, hi))
        self._driver.__enter__()
        if lo == 0:
            self._driver.start()  # θ_0: before the loop's first step
        return self

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """After an optimizer step: the LCA of θ_t → θ_{t+1} (``loss``: the step's mini-batch loss, kept
        with the row when given)."""
        if self._driver is None:
            raise RuntimeError("call step() inside `with track(...) as lca:`")
        batch = torch.as_tensor(
            float("nan") if loss is None else float(torch.as_tensor(loss).detach()), device=self.device
        )
        self._driver.iteration(self.t, lambda t: batch)
        self.rows += int(self._window[0] <= self.t < self._window[1])
        self.t += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        driver, self._driver = self._driver, None
        try:
            driver.__exit__(exc_type, exc, tb)
            if exc_type is None and self.rows:
                self.recorder.write_counters()
                for k, v in self.recorder.summary(self.rows).items():
                    if isinstance(v, (int, float, str)):
                        self.writer.set_attr(f"summary/{k}", v)
        finally:
            self.writer.__exit__(exc_type, exc, tb)

    # -- helpers --------------------------------------------------------------------------------------------

    def _flat(self) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.pnames])

    def _attrs(self, chunk: int) -> dict[str, Any]:
        cls = type(self.model)
        config = {
            "net": {"_target_": f"{cls.__module__}.{cls.__qualname__}"},
            "lca": dict(self.lca),
            "store": self.store,
            "loop": "track",
        }
        return {
            "config": yaml.safe_dump(config, sort_keys=False),
            "lca_lab_version": __version__,
            "torch_version": torch.__version__,
            "device": str(self.device),
            "data_source": "track.train_data",
            "data_fingerprint": json.dumps(self.data.fingerprint, sort_keys=True),
            "lca_chunk_size": chunk,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def track(
    model: torch.nn.Module, train_data: Any, run_dir: str | Path, *,
    loss_fn: Callable[..., torch.Tensor] | None = None, lca: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = None,
) -> LCATracker:  # fmt: skip
    """LCA of the optimizer steps of your own loop, written to ``<run_dir>/lca.h5`` (see the module).

    Args:
        model: the network being trained (its parameters are read, never changed).
        train_data: a torch ``Dataset`` of ``(inputs, target)`` items, or an ``(x, y)`` pair of tensors.
        run_dir: where the run file goes.
        loss_fn: a per-target loss taking ``reduction`` (default ``torch.nn.CrossEntropyLoss``).
        lca: ``method``, ``tolerance``, ``max_splits``, ``adaptive``, ``chunk_size``, ``window`` (the keys of
            ``conf/lca``).
        store: ``per_param``, ``trajectory``, ``flush_every`` (the keys of ``store``).
    """
    return LCATracker(model, train_data, run_dir, loss_fn=loss_fn, lca=lca, store=store)
