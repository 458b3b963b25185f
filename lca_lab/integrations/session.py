"""The core of LCA inside a training loop that is not lca_lab's: :class:`LCASession`.

``track()``, the Lightning ``LCACallback`` and the Hugging Face ``LCATrainerCallback`` are three faces of
this one object. The loop calls :meth:`LCASession.open` before its first optimizer step,
:meth:`LCASession.step` after every optimizer step and :meth:`LCASession.close` at the end (with the
exception, if it ended on one). Each step's LCA is computed by the same engine, recorder, reducers and
run-file writer as ``python -m lca_lab``, so ``python -m lca_lab.analyze RUN_DIR`` works as for any run.

What the session owns, and why:

* **L** is the loss over the whole ``train_data`` (the rules of "Your own model and data": dict inputs,
  per-token targets, ``-100`` not counted, L = Σ per-target loss / counted targets), with every module in
  eval mode but BatchNorm, whatever mode the loop left the model in.
* **Precision.** The passes run with autocast off and ``lca["precision"]`` matmuls, in the parameters'
  dtype: a loop's mixed precision (Lightning ``precision="bf16-mixed"``, HF ``bf16=True``) changes its
  steps, never how L is measured.
* **Steps, not batches.** One row per optimizer step (``every=k``: per k optimizer steps, the segment
  θ_t → θ_{t+k}); a loop accumulating gradients over micro-batches calls :meth:`step` once per update.
* **Ranks.** In a ``torch.distributed`` process group of several ranks (DDP under Lightning, torchrun or
  accelerate under HF), L's passes are sharded over the ranks (``lca_lab.dist``) and rank 0 alone writes.
  Every rank must call :meth:`step` at every optimizer step (the passes' all-reduces are collective).
* **Nothing computed is lost.** A loop that ends on an exception keeps every row, ``status`` =
  ``failed: …``; :meth:`state_dict` / ``open(resume=…)`` continue the run file from a trainer checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from .. import __version__
from ..dist import SINGLE, NoWriter, Shard
from ..examples import tree_map
from ..lca import (
    FullBatchLoss,
    LayerSums,
    LCAEngine,
    auto_chunk_size,
    check_engine_options,
    matmul_precision,
)
from ..loop import Launched, LCADriver, StepRecorder
from ..nets import entry_layer_index, layer_groups, param_layer_index
from ..parts import build_loss
from ..reducers import LCAReducer
from ..splits import bundle_from
from ..store import RunWriter

LCA_DEFAULTS = {"method": "rk4", "tolerance": 1e-3, "max_splits": 32, "adaptive": True, "chunk_size": "auto",
                "window": None, "per_class": False, "test": None, "precision": "fp32"}  # fmt: skip
STORE_DEFAULTS = {"per_param": True, "trajectory": False, "flush_every": 50}
STATE_VERSION = 1


class _Pair(Dataset):
    """An ``(inputs, targets)`` pair as a Dataset: inputs a tensor, tuple or dict of tensors ``[N, ...]``;
    lca_lab reads the whole tensors (``inputs`` / ``targets``) without going item by item."""

    def __init__(self, inputs: Any, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        return tree_map(lambda t: t[i], self.inputs), self.targets[i]


def as_dataset(data: Any, name: str = "train_data") -> Any:
    """A Dataset (or a data target's mapping) as given; an ``(x, y)`` pair of tensors as a Dataset."""
    if isinstance(data, (Dataset, Mapping)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return _Pair(*data)
    raise TypeError(f"{name} must be a torch Dataset or an (x, y) pair of tensors, got {type(data).__name__}")


def _options(given: Mapping[str, Any] | None, defaults: dict[str, Any], group: str) -> dict[str, Any]:
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"{group} keys {sorted(unknown)} are unknown; valid: {', '.join(defaults)}")
    return {**defaults, **(given or {})}


def check_options(
    lca: Mapping[str, Any] | None, store: Mapping[str, Any] | None, test_data: Any = None, every: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``lca`` and ``store`` options with their defaults, checked (ValueError naming the fix, before
    any training) → (lca, store)."""
    lca, store = _options(lca, LCA_DEFAULTS, "lca"), _options(store, STORE_DEFAULTS, "store")
    check_engine_options(lca["method"], float(lca["tolerance"]), int(lca["max_splits"]))
    if lca["precision"] not in ("fp32", "tf32"):
        raise ValueError(f"lca precision={lca['precision']!r} must be fp32 or tf32")
    if int(every) < 1:
        raise ValueError(f"every={every} must be ≥ 1 (optimizer steps per LCA row)")
    if lca["test"] and test_data is None:
        raise ValueError("lca test=True needs test_data (held-out examples to score each step on)")
    if test_data is not None:
        as_dataset(test_data, "test_data")  # the type check
    return lca, store


def shard_of_group() -> Shard:
    """This process's rank and the world of the default ``torch.distributed`` group (one process: SINGLE)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            return Shard(torch.distributed.get_rank(), world)
    return SINGLE


class LCASession:
    """LCA of the optimizer steps of a loop that is not lca_lab's, written to ``<run_dir>/lca.h5``.

    Args:
        model: the network being trained (its parameters are read, never changed).
        train_data: a torch ``Dataset`` of ``(inputs, target)`` items, or an ``(x, y)`` pair of tensors.
        run_dir: where the run file goes (created).
        loss_fn: a per-target loss taking ``reduction`` (default ``torch.nn.CrossEntropyLoss``).
        lca: the keys of ``conf/lca``: ``method``, ``tolerance``, ``max_splits``, ``adaptive``,
            ``chunk_size``, ``window`` ([start, stop) in optimizer steps), ``per_class``, ``test`` (LCA on
            ``test_data`` too; default: when ``test_data`` is given), ``precision`` (fp32 | tf32).
        store: ``per_param``, ``trajectory``, ``flush_every`` (the keys of ``store``).
        test_data: held-out data (as ``train_data``): the motion of each step scored on it as well.
        every: one row per ``every`` optimizer steps (the LCA of the segment θ_t → θ_{t+every}).
        tracker: where the LCA series are logged besides the run file: a tracker object (lca_lab's
            ``WandbTracker``, e.g. attached to a trainer's W&B run), a dict of ``conf/logger`` keys (``mode``,
            ``project``, ``log_every``, …: lca_lab's own W&B run, started by :meth:`open`), or None.
        figures: at a complete end, write the run's figures and report.md next to its run file (as
            ``python -m lca_lab`` does) and log them to the tracker.
        overwrite: replace a run file already in ``run_dir`` (default: refuse it, naming the fix).
        label: how the run was made (the ``loop`` entry of the stored config: track, lightning, hf).
    """

    def __init__(
        self, model: torch.nn.Module, train_data: Any, run_dir: str | Path, *,
        loss_fn: Callable[..., torch.Tensor] | None = None, lca: Mapping[str, Any] | None = None,
        store: Mapping[str, Any] | None = None, test_data: Any = None, every: int = 1,
        tracker: Any = None, figures: bool = False, overwrite: bool = False, label: str = "track",
    ):  # fmt: skip
        self.lca, self.store = check_options(lca, store, test_data, every)
        self.every, self.label, self.tracker, self.figures = int(every), label, tracker, bool(figures)
        self.overwrite = bool(overwrite)
        self.model, self.run_dir = model, Path(run_dir)
        self.train_data, self.test_data = as_dataset(train_data), test_data
        self.loss_fn = loss_fn or build_loss(None)
        window = self.lca["window"]
        self.lo, self.hi = (0, float("inf")) if window is None else (int(window[0]), int(window[1]))
        self.t = 0  # optimizer steps taken
        self.rows = 0  # rows recorded (resumed ones included)
        self._driver: LCADriver | None = None
        self._theta0: torch.Tensor | None = None  # θ at the start of the current row's segment
        self._t0 = 0  # the optimizer step at that start (the row's lca/iteration)

    # -- building -------------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._driver is not None

    def _data(self, device: torch.device):
        test = None if self.test_data is None else as_dataset(self.test_data, "test_data")
        return bundle_from(self.train_data, f"{self.label}.train_data", device, test=test)

    def open(self, t: int = 0, resume: Mapping[str, Any] | None = None) -> LCASession:
        """Build the engine and the run file and read θ (``t``: optimizer steps already taken, e.g. a
        resumed trainer's; ``resume``: a :meth:`state_dict` to continue the run file from)."""
        path = self.run_dir / "lca.h5"
        if resume is None and path.exists() and not self.overwrite:
            raise FileExistsError(
                f"{path} exists already: give another run_dir, pass overwrite=True to replace it, or resume "
                "the trainer from one of its checkpoints to continue it"
            )
        model = self.model
        self.device = device = next(model.parameters()).device
        self.shard = shard_of_group()
        self.data = self._data(device)
        groups = layer_groups(model)
        self.layer_names = [g[0] for g in groups]
        named = dict(model.named_parameters())
        self.pnames = [n for n, p in named.items() if p.requires_grad]
        index = entry_layer_index(model).to(device)
        chunk = self.lca["chunk_size"]
        ex = self.data.train
        chunk = auto_chunk_size(model, len(ex), device, ex.head(4)) if chunk == "auto" else int(chunk)
        engine = self._engine(index, len(groups), chunk)
        if self.shard.rank != 0:
            self.tracker = None  # rank 0 logs
        elif isinstance(self.tracker, Mapping):  # lca_lab's own W&B run, once every check has passed
            from ..tracking import WandbTracker

            config = yaml.safe_load(self._attrs(chunk)["config"])
            self.tracker = WandbTracker(dict(self.tracker), config, self.run_dir, name=self.label)
        if self.shard.rank == 0:
            self.writer = RunWriter(
                self.run_dir / "lca.h5", param_names=self.pnames,
                param_shapes=[tuple(named[n].shape) for n in self.pnames],
                param_layer=param_layer_index(model), layer_names=self.layer_names, attrs=self._attrs(chunk),
                per_param=bool(self.store["per_param"]), trajectory=bool(self.store["trajectory"]),
                flush_every=int(self.store["flush_every"]),
                n_classes=self.data.n_classes if self.lca["per_class"] else None,
                resume=None if resume is None else resume["file_rows"], overwrite=self.overwrite,
            )  # fmt: skip
        else:
            self.writer = NoWriter()
        self.writer.__enter__()
        self.recorder = StepRecorder(
            LCAReducer(index, len(groups), engine.layer_sums), self.writer,
            per_param=bool(self.store["per_param"]), trajectory=bool(self.store["trajectory"]),
            layer_names=self.layer_names, divergence_hint=None,
            tracker=self.tracker,
        )  # fmt: skip
        self._driver = LCADriver(engine, self.recorder, self._flat, pipelined=not self.shard.active)
        with self._passes():
            if resume is not None:
                self._resume(resume)
            else:
                self.t = int(t)
                self._begin_segment()
        return self

    def _engine(self, index: torch.Tensor, n_layers: int, chunk: int) -> LCAEngine:
        per_class = bool(self.lca["per_class"])
        fbl = FullBatchLoss(
            self.model, self.data.train, None, chunk, loss_fn=self.loss_fn, param_names=self.pnames,
            n_classes=self.data.n_classes if per_class else None, shard=self.shard,
        )  # fmt: skip
        test_on = self.lca["test"] if self.lca["test"] is not None else self.test_data is not None
        test_fbl = None
        if test_on:
            test_fbl = FullBatchLoss(
                self.model, self.data.test, None, chunk, loss_fn=self.loss_fn, param_names=self.pnames,
                shard=self.shard,
            )  # fmt: skip
        self.chunk = chunk
        return LCAEngine(
            fbl, self.lca["method"], float(self.lca["tolerance"]), int(self.lca["max_splits"]),
            bool(self.lca["adaptive"]), per_class=per_class, test_loss=test_fbl,
            layer_sums=LayerSums(index, n_layers),
        )  # fmt: skip

    # -- the loop's calls -----------------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """After an optimizer step: the LCA of θ_t → θ_{t+1} (or of the segment, with ``every``);
        ``loss``: the step's mini-batch loss, kept with the row (``train/batch_loss`` in W&B)."""
        if self._driver is None:
            raise RuntimeError("the LCA session is not open: call step() inside `with track(...) as lca:`")
        self.t += 1
        with self._passes():
            if self._theta0 is not None and (self.t - self._t0 == self.every or self.t >= self.hi):
                self._launch(loss)
            elif self._theta0 is None:
                self._begin_segment()

    def _launch(self, loss: torch.Tensor | float | None) -> None:
        if isinstance(loss, torch.Tensor):  # stays on the device: the tracker reads it with the others
            batch = loss.detach().reshape(()).to(self.device)
        else:
            batch = torch.tensor(float("nan") if loss is None else float(loss), device=self.device)
        theta1 = self._flat()
        driver = self._driver
        driver.push(Launched(self._t0, driver.engine.launch(self._theta0, theta1), theta1, batch))
        if not driver.pipelined:
            driver.drain()
        self.rows += 1
        self._theta0 = None
        self._begin_segment(theta1)

    def _begin_segment(self, theta: torch.Tensor | None = None) -> None:
        """θ at optimizer step ``t`` starts a row's segment when ``t`` is in the window (the window's first
        point is primed and recorded as the start of the point series)."""
        if not self.lo <= self.t < self.hi:
            if self.t >= self.hi:
                self._driver.drain()  # the end of the window: every row recorded
            return
        if self.t == self.lo:
            theta = self._driver.start()
        self._theta0 = theta if theta is not None else self._flat()
        self._t0 = self.t

    def close(self, exc: BaseException | None = None) -> None:
        """Record what is launched, write the counters and summary (a complete run) and close the run file
        with ``status`` complete, or ``failed: …`` for ``exc``. Idempotent."""
        driver, self._driver = self._driver, None
        if driver is None:
            return
        exc_info = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
        try:
            with self._passes():
                driver.__exit__(*exc_info)
            if exc is None and self.rows:
                self.recorder.write_counters()
                for k, v in self.summary().items():
                    if isinstance(v, (int, float, str)):
                        self.writer.set_attr(f"summary/{k}", v)
        finally:
            self.writer.__exit__(*exc_info)
            if exc is not None and self.tracker is not None:
                self.tracker.finish(1)
        if exc is None and self.shard.rank == 0:
            self._report()

    def _report(self) -> None:
        """A complete run's figures and report.md (the analyze command's code) and its tracker's summary."""
        if self.figures and self.rows:
            from ..analyze import analyze  # matplotlib and scipy: only when figures are asked for

            analyze(self.run_dir, repeats=200)
        if self.tracker is not None:
            if self.rows:
                self.tracker.log_summary(self.summary(), self.run_dir / "lca.h5")
            if self.figures and self.rows:
                self.tracker.log_figures(self.run_dir)
            self.tracker.finish(0)

    def summary(self) -> dict[str, Any]:
        """The run's summary (as ``python -m lca_lab`` prints it): the rows recorded so far."""
        return self.recorder.summary(self.rows)

    # -- a trainer's checkpoint -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a trainer checkpoint keeps to continue this run file: the rows on disk (every launched row
        recorded and flushed first), the reducers' and summary's sums, the step count, the segment's θ."""
        if self._driver is None:
            return {}
        with self._passes():
            self._driver.drain()
        self.writer.flush()
        self.writer.wait()
        return {
            "version": STATE_VERSION,
            "t": self.t,
            "t0": self._t0,
            "rows": self.rows,
            "file_rows": self.writer.committed_rows() if self.shard.rank == 0 else {},
            "recorder": self.recorder.state_dict(),
            "theta0": None if self._theta0 is None else self._theta0.detach().cpu(),
        }

    def _resume(self, state: Mapping[str, Any]) -> None:
        self.t, self._t0, self.rows = int(state["t"]), int(state["t0"]), int(state["rows"])
        self.recorder.load_state_dict(_to_device(state["recorder"], self.device))
        if self.shard.rank == 0:
            self.writer.set_attr("resumed", f"from optimizer step {self.t} at {_now()}")
        if state["theta0"] is not None:
            self._theta0 = state["theta0"].to(self.device)
            self._driver.engine.prime(self._theta0)  # its gradient: recomputed, not stored
        else:
            self._begin_segment()

    # -- helpers --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _passes(self):
        """L's passes as lca_lab defines them: no autocast of the loop, the matmul precision asked for."""
        with torch.autocast(self.device.type, enabled=False), matmul_precision(str(self.lca["precision"])):
            yield

    def _flat(self) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.pnames])

    def _attrs(self, chunk: int) -> dict[str, Any]:
        cls = type(self.model)
        config = {
            "net": {"_target_": f"{cls.__module__}.{cls.__qualname__}"},
            "lca": dict(self.lca),
            "store": self.store,
            "loop": self.label,
            "every": self.every,
        }
        return {
            "config": yaml.safe_dump(config, sort_keys=False),
            "lca_lab_version": __version__,
            "torch_version": torch.__version__,
            "device": str(self.device),
            "data_source": f"{self.label}.train_data",
            "data_fingerprint": json.dumps(self.data.fingerprint, sort_keys=True),
            "data_info": json.dumps(self.data.info, sort_keys=True, default=str),
            "lca_chunk_size": chunk,
            "lca_loop": self.label,  # track | lightning | hf: the loop that took the steps
            "lca_every": self.every,  # optimizer steps per row
            "dist_world_size": self.shard.world,
            "created": _now(),
        }


def _to_device(state: Any, device: torch.device) -> Any:
    """A state dict's tensors on ``device`` (a trainer checkpoint is loaded to the CPU); the rest as is."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, Mapping):
        return {k: _to_device(v, device) for k, v in state.items()}
    return state


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
