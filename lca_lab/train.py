"""One run: config → data / net / optimizer → training loop → LCA engine → run file → summary.

``run(cfg, run_dir)`` takes the resolved config as a plain dict (no Hydra objects), so it can be
called from tests and notebooks as well as from ``python -m lca_lab``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (
    CHECKPOINT_NAME,
    PreemptionSignals,
    RunDirLock,
    RunPreempted,
    plan_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, validate
from .dist import SINGLE, NoWriter, Shard, broadcast_object, broadcast_params_
from .examples import CachedExamples, StreamedExamples, call, correct_targets, target_loss
from .lca import FullBatchLoss, LayerSums, LCAEngine, auto_chunk_size, set_matmul_precision
from .loop import LCADriver, StepRecorder
from .nets import entry_layer_index, param_layer_index
from .optim import apply_freezes
from .parts import build_parts, check_parts
from .reducers import LCAReducer
from .speed import check_settings, pass_settings
from .store import RunWriter, estimate_bytes
from .store.sizing import resolve_per_param
from .subset_engine import SubsetEngine, subset_attrs, subset_engine
from .tracking import start_tracker


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` without a GPU is an error naming the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} but no CUDA device is available here; use device=cpu or device=auto"
        )
    return torch.device(name)


def git_sha() -> str:
    """The commit of the lca_lab checkout, or '' outside a git work tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# Test hook: the process kills itself with SIGKILL once this many iterations are done (after their rows
# are buffered or flushed, before any checkpoint at that boundary), to test resuming from a hard kill.
TEST_KILL_ENV = "LCA_LAB_TEST_SIGKILL_AT_ITERATION"
# Errors of a full or failing disk, turned into StorageError with the committed row count.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


class StorageError(RuntimeError):
    """Writing the run file or the checkpoint failed (disk full, quota, read-only, I/O error)."""


def check_writable(run_dir: Path) -> None:
    """Refuse, before any compute, a run directory that cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".lca_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write to the run directory {run_dir} ({e.strerror or e}); "
            "choose a writable one with hydra.run.dir=PATH (or run from a writable folder)"
        ) from None


def check_run_dir(run_dir: Path) -> None:
    """Refuse, before any compute, a run directory that cannot take a new run file."""
    check_writable(run_dir)
    if (run_dir / "lca.h5").exists():
        raise ConfigError(
            f"{run_dir / 'lca.h5'} already exists: a run directory holds one run. Use another "
            "hydra.run.dir, or move the old run away; it is not overwritten."
        )


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: Any, y: torch.Tensor | None, chunk: int, loss_fn=F.cross_entropy
) -> tuple[float, float]:
    """Mean loss per counted target (``loss_fn(logits, y, reduction="sum")`` / their number; cross-entropy
    in nats by default) and accuracy (share of counted targets whose arg-max logit is right), in eval mode
    (BN running stats, no dropout). ``x``: inputs [N, ...] with targets ``y``, or examples (``y`` None)."""
    ex = x if isinstance(x, (CachedExamples, StreamedExamples)) else CachedExamples(x, y)
    if len(ex) == 0 or ex.n_counted == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    mask = ex.has_ignored and getattr(loss_fn, "ignore_index", None) != -100
    loss = correct = None
    for xb, yb in ex.chunks(chunk):
        out = call(model, xb)
        part = target_loss(loss_fn, out, yb, "sum", mask).double()
        hits = correct_targets(out, yb)
        loss, correct = (part, hits) if loss is None else (loss + part, correct + hits)
    model.train(was)
    return float(loss) / ex.n_counted, float(correct) / ex.n_counted


def run(
    cfg: dict[str, Any],
    run_dir: str | os.PathLike,
    extra_attrs: dict[str, str] | None = None,
    tracker: Any = None,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Train one network with online LCA; write ``<run_dir>/lca.h5``; return the summary dict.

    ``shard``: this process's rank when the run is spread over several (:mod:`lca_lab.dist`; torchrun).
    Every rank trains the same trajectory and evaluates its share of L's passes; rank 0 alone locks the
    run directory, writes the run file, checkpoints and tracks; the others write nothing and return ``{}``.

    ``extra_attrs`` go into the run file's attributes (the CLI stores the Hydra overrides there).
    ``tracker`` (optional, e.g. ``tracking.WandbTracker``, or a zero-argument factory of one, called
    once the start-up checks have passed; its ``attrs`` join the run file's) gets
    ``log_iteration(it, **values)`` with device tensors it must buffer (no host sync here) and
    ``log_eval(it, **values)``.

    The run directory is locked for the whole run (a second process is refused). If it holds a
    checkpoint of this config (or ``resume=true`` is set) the run continues from it; see
    :func:`lca_lab.checkpoint.plan_resume`. A resumed run is built from ``cfg`` — the caller's config
    (the command line's), which is trusted as any command is — and never from the config stored in the
    checkpoint or run file, so no ``_target_`` read from a file is instantiated here (the checkpoint must
    match ``cfg``); ``lca_lab.recompute``, which does build from a stored config, passes it through
    :func:`lca_lab.parts.check_targets` first. SIGTERM/SIGUSR1/SIGUSR2 make the run checkpoint at the next
    iteration boundary, set ``status`` to ``preempted: …`` and raise :class:`RunPreempted` — after
    handing the signal to the handler installed before (submitit's requeue), if there was one.
    """
    validate(cfg)
    check_parts(cfg)  # every _target_ importable, its arguments known (net.width=-3 too): before any data
    device = resolve_device(cfg["device"])
    run_dir = Path(run_dir)
    shard = shard or SINGLE
    if shard.rank != 0:
        return _follow(cfg, run_dir, device, shard)
    check_writable(run_dir)
    ckcfg = cfg.get("checkpoint") or {}
    try:
        with RunDirLock(run_dir), PreemptionSignals(bool(ckcfg.get("enabled", True))) as signals:
            mode, ck = plan_resume(run_dir, cfg)
            _agree_on_start(shard, mode, ck)
            return _run(cfg, run_dir, extra_attrs, device, mode, ck, signals, tracker, shard)
    except RunPreempted as e:
        if callable(e.previous_handler):  # e.g. submitit: requeue this job (it then exits the process)
            e.previous_handler(e.signum, None)
        raise
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        raise StorageError(
            f"writing to {run_dir} failed ({e.strerror or e}); lca.h5 keeps every row committed before "
            "it (readable, status 'failed: …'). Free space and rerun the same command to continue from "
            "the last checkpoint."
        ) from e


@dataclass
class Built:
    """What :func:`build` makes of a config: the parts of one run, before any compute.

    Attributes:
        data: the :class:`~lca_lab.data.DataBundle` on the device (``train_x`` [N, C, H, W] …).
        model: the network (training mode), on the device, in its memory format.
        optimizer: built with the per-layer param groups.
        groups: [(layer name, [parameter names])], input → output.
        named: {name: parameter}; pnames: names of the trainable ones, in θ's order.
        param_layer: layer index of each tensor of ``pnames``; index: [K] int64 layer of every entry of θ.
        K: number of trainable scalars.
        chunk: examples per chunk of L's passes (resolved ``lca.chunk_size``).
        channels_last, cuda_graph, cudnn_bm, compile_passes: how L's passes run.
        engine: the :class:`~lca_lab.lca.LCAEngine`, None with LCA off.
        per_class, test_lca: per-class and held-out LCA on.
        loss_fn: the configured loss, ``loss_fn(logits, targets, reduction=...)``.
        label: the net's short name for the progress bar.
    """

    data: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    groups: list
    named: dict[str, torch.nn.Parameter]
    pnames: list[str]
    param_layer: Any
    index: torch.Tensor
    K: int
    chunk: int
    channels_last: bool
    cuda_graph: bool
    cudnn_bm: bool
    compile_passes: bool
    engine: LCAEngine | SubsetEngine | None  # SubsetEngine with lca.estimate=subset
    per_class: bool
    test_lca: bool
    loss_fn: Any
    label: str
    shard: Shard = SINGLE  # this process's rank and share of L's passes (lca_lab.dist)


def build(cfg: dict[str, Any], device: torch.device, shard: Shard = SINGLE) -> Built:
    """Data, network, speed settings of L's passes, chunk size, layer plans, optimizer and LCA engine of
    ``cfg`` on ``device`` (ConfigError naming the key for a bad value)."""
    lcfg = cfg["lca"]
    check_settings(lcfg, device if lcfg.get("enabled", True) else None, bool(cfg["deterministic"]))

    # data (on the device), net (seeded), loss, layer groups and plans, optimizer: lca_lab.parts
    parts = build_parts(cfg, device, warn=tqdm.write)
    data, model, loss_fn, groups, optimizer = (
        parts.data,
        parts.model,
        parts.loss_fn,
        parts.groups,
        parts.optimizer,
    )
    speed = pass_settings(model, device, lcfg, bool(cfg["deterministic"]))  # how L's passes run
    # A CUDA graph replays fixed addresses: never for streamed data (FullBatchLoss keeps those passes eager).
    channels_last, cuda_graph = speed.channels_last, speed.cuda_graph and not data.streamed
    cudnn_bm, compile_passes = speed.cudnn_benchmark, speed.compile
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    chunk = lcfg.get("chunk_size", 5000)
    if chunk == "auto":
        chunk = auto_chunk_size(model, data.n_train, device, data.train.head(4))
    chunk = int(chunk)
    named = dict(model.named_parameters())
    pnames = [n for n, p in named.items() if p.requires_grad]
    param_layer = param_layer_index(model)
    index = entry_layer_index(model).to(device)  # [K] layer of every entry of θ
    K = int(index.numel())

    n_train = data.n_train
    if int(cfg["batch_size"]) > n_train:
        raise ConfigError(
            f"batch_size={cfg['batch_size']} is larger than the training set ({n_train} examples of "
            f"{data.source}); use batch_size ≤ {n_train}"
        )
    lca_on = bool(lcfg.get("enabled", True))
    engine = None
    per_class = bool(lcfg.get("per_class", False))
    if per_class and (data.target_shape != () or data.train.has_ignored):
        raise ConfigError(
            f"lca.per_class=true needs one class index per example, but {data.source}'s targets have shape "
            f"{list(data.target_shape)} per example{' and -100 entries' if data.train.has_ignored else ''} "
            "(e.g. one per token); use lca.per_class=false"
        )
    test_lca = bool(lcfg.get("test", False)) and len(data.test) > 0
    subset = lca_on and lcfg.get("estimate", "exact") == "subset"
    if subset:  # the subset's passes are eager, in one process (lca_lab.estimate)
        if shard.active:
            raise ConfigError(
                "lca.estimate=subset runs in one process; drop torchrun or use lca.estimate=exact"
            )
        speed = dataclasses.replace(speed, cuda_graph=False, compile=False)
        cuda_graph = compile_passes = False
    if lca_on:
        # How L's passes run (layout, graphs, cuDNN autotuning): its value only to float rounding.
        fast = speed.engine_kwargs()
        fbl = FullBatchLoss(
            model, data.train, None, chunk, loss_fn=loss_fn, param_names=pnames,
            n_classes=data.n_classes if per_class else None, shard=shard, **fast,
        )  # fmt: skip
        test_fbl = (
            FullBatchLoss(
                model, data.test, None, chunk, loss_fn=loss_fn, param_names=pnames, shard=shard, **fast
            )
            if test_lca
            else None
        )
        engine = LCAEngine(
            fbl, lcfg["method"], float(lcfg["tolerance"]), int(lcfg["max_splits"]),
            bool(lcfg.get("adaptive", True)), per_class=per_class, test_loss=test_fbl,
            layer_sums=LayerSums(index, len(groups)),  # each step's per-layer LCA comes with its total
        )  # fmt: skip
        if subset:
            try:
                engine = subset_engine(fbl, engine, lcfg, int(cfg["seed"]))
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return Built(
        data, model, optimizer, groups, named, pnames, param_layer, index, K, chunk, channels_last,
        cuda_graph, cudnn_bm, compile_passes, engine, per_class, test_lca, loss_fn, parts.label, shard,
    )  # fmt: skip


def _agree_on_start(shard: Shard, mode: str | None, ck: dict[str, Any] | None) -> tuple[str, Any]:
    """Rank 0's start (new / restart / resume, and its checkpoint) on every rank: one broadcast, so every
    rank resumes from the same state and no other rank needs to read the run directory."""
    if not shard.active:
        return mode, ck
    return broadcast_object((mode, ck) if shard.rank == 0 else None)


def _follow(cfg: dict[str, Any], run_dir: Path, device: torch.device, shard: Shard) -> dict[str, Any]:
    """A rank other than 0: the same training and its share of L's passes, nothing written."""
    mode, ck = _agree_on_start(shard, None, None)
    set_determinism(int(cfg["seed"]), bool(cfg["deterministic"]))
    set_matmul_precision(str(cfg["lca"].get("precision", "fp32")))
    b = build(cfg, device, shard)
    plan = _Plan.of(cfg, b)
    plan.per_param = False  # rows go nowhere here
    loop = _TrainLoop(cfg, b, plan, NoWriter(), None)
    if ck is not None:
        loop.resume(ck, "")
        del ck
    loop.run([_kill_test(shard.rank)])  # rank 0 alone evaluates and checkpoints
    return {}


def _run(
    cfg: dict[str, Any],
    run_dir: Path,
    extra_attrs: dict[str, str] | None,
    device: torch.device,
    mode: str,
    ck: dict[str, Any] | None,
    signals: PreemptionSignals,
    tracker: Any = None,
    shard: Shard = SINGLE,
) -> dict[str, Any]:
    """The body of :func:`run` with the run directory locked (``mode``: new / restart / resume):
    build → loop → finish."""
    set_determinism(int(cfg["seed"]), bool(cfg["deterministic"]))
    set_matmul_precision(str(cfg["lca"].get("precision", "fp32")))  # training and LCA alike
    b = build(cfg, device, shard)
    plan = _Plan.of(cfg, b)
    plan.per_param = _check_size(cfg, b, plan, run_dir, ck)
    if callable(tracker) and not hasattr(tracker, "log_iteration"):
        # A tracker factory: its (W&B) run starts only now, after every start-up check has passed; a
        # resumed run continues the W&B run its run file records.
        tracker = start_tracker(tracker, run_dir / "lca.h5" if ck is not None else None)
        extra_attrs = {**(extra_attrs or {}), **(getattr(tracker, "attrs", None) or {})}
    attrs = _attrs(cfg, b, device, extra_attrs)
    writer = _open_writer(run_dir / "lca.h5", cfg, b, plan, attrs, mode, ck)
    loop = _TrainLoop(cfg, b, plan, writer, tracker)
    if ck is not None:
        loop.resume(ck, attrs["created"])
        del ck
    ck_on = bool((cfg.get("checkpoint") or {}).get("enabled", True))
    with writer:
        if mode != "resume":
            writer.write_array("data/train_index", np.asarray(b.data.train_index, dtype=np.int64))
            writer.write_array("data/train_order", loop.trainer.epoch_orders())
        loop.run(_boundaries(cfg, loop, plan, run_dir, attrs["config"], signals, ck_on))
        summary = _finish(loop, plan, attrs["device"])
    if ck_on:
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)  # complete: nothing left to resume
    return summary


@dataclass
class _Plan:
    """The run's length and LCA window: ``per_epoch`` iterations per epoch, ``total_iters``, LCA of the
    steps ``lo ≤ t < hi`` (``n_rows`` rows; 0 with LCA off), ``theta_only``: LCA off with
    ``store.trajectory``, θ_t kept for t = lo..hi anyway, for offline LCA (lca_lab.recompute);
    ``per_param``: per-parameter rows stored (``store.per_param`` as :func:`_check_size` resolved it)."""

    per_epoch: int
    total_iters: int
    lo: int
    hi: int
    n_rows: int
    theta_only: bool
    per_param: bool = True

    @classmethod
    def of(cls, cfg: dict[str, Any], b: Built) -> _Plan:
        per_epoch = math.ceil(b.data.n_train / int(cfg["batch_size"]))
        total_iters = per_epoch * int(cfg["epochs"])
        lca_on = b.engine is not None
        window = cfg["lca"].get("window")
        lo, hi = (0, total_iters) if window is None else (int(window[0]), min(int(window[1]), total_iters))
        n_rows = max(hi - lo, 0) if lca_on else 0
        return cls(per_epoch, total_iters, lo, hi, n_rows, bool(cfg["store"]["trajectory"]) and not lca_on)


def _check_size(cfg: dict[str, Any], b: Built, plan: _Plan, run_dir: Path, ck: Any = None) -> bool:
    """Resolve ``store.per_param`` (:func:`lca_lab.store.sizing.resolve_per_param`; ``auto`` says in one
    line when it leaves the per-parameter rows out; a resumed run ``ck`` continues as its file started),
    then refuse, before any compute, a run file over ``store.max_gb`` or over the free disk space.
    Returns whether per-parameter rows are stored."""
    scfg = cfg["store"]

    def size_of(per_param: bool) -> int:  # bytes of the run file
        size = estimate_bytes(b.K, plan.n_rows, per_param, bool(scfg["trajectory"]), len(b.groups))
        size += 16 * b.K if plan.n_rows else 0  # the reducers' four [K] int32 counters (reduce/*)
        return size + (4 * b.K * (max(plan.hi - plan.lo, 0) + 1) if plan.theta_only else 0)

    held = None if ck is None else "lca/param" in ck["rows"]
    per_param, note = resolve_per_param(scfg["per_param"], float(scfg["max_gb"]), size_of, held)
    if note:
        tqdm.write(note)
    size = size_of(per_param)
    if size > float(scfg["max_gb"]) * 1e9:
        shrink = "store.per_param=false (keeps per-layer LCA), " if per_param else ""
        raise ConfigError(
            f"the run file would be {size / 1e9:.2f} GB ({plan.n_rows} LCA rows × {b.K:,} parameters), over "
            f"store.max_gb={scfg['max_gb']}. Shrink it with {shrink}"
            f"store.trajectory=false, a shorter lca.window=[start,stop], fewer epochs, or raise store.max_gb."
        )
    free = shutil.disk_usage(run_dir).free
    if size > free:
        raise ConfigError(
            f"the run file needs about {size / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free in "
            f"{run_dir}; free space{' or use store.per_param=false' if per_param else ''}."
        )
    return per_param


def _attrs(
    cfg: dict[str, Any], b: Built, device: torch.device, extra: dict[str, str] | None
) -> dict[str, Any]:
    """The run file's attributes (the resolved config, versions, device, how L's passes run)."""
    return {
        "config": yaml.safe_dump(cfg, sort_keys=False),
        "lca_lab_version": __version__,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "data_source": b.data.source,
        # the splits' sizes and hashes (a recompute checks them), the data target's provenance
        "data_fingerprint": json.dumps(b.data.fingerprint, sort_keys=True),
        "data_info": json.dumps(b.data.info, sort_keys=True, default=str),
        "lca_stream": b.data.streamed,  # L's passes read the training data from its Dataset
        "lca_chunk_size": b.chunk,  # resolved (lca.chunk_size=auto): part of L's definition for BN nets
        "lca_channels_last": b.channels_last,
        "lca_cuda_graph": b.cuda_graph,
        "lca_cudnn_benchmark": b.cudnn_bm,
        "lca_compile": b.compile_passes,
        "dist_world_size": b.shard.world,  # ranks that shared L's passes (1: one process)
        "dist_backend": tdist.get_backend() if b.shard.active else "",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # exact, or subset and the subset's size (lca_lab.estimate, docs/estimates.md)
        **(subset_attrs(b.engine) if isinstance(b.engine, SubsetEngine) else {"lca_estimate": "exact"}),
        **(extra or {}),
    }


def _open_writer(
    path: Path, cfg: dict[str, Any], b: Built, plan: _Plan, attrs: dict[str, Any], mode: str, ck: Any
) -> RunWriter:
    """The run file's writer: new, restarted (``overwrite``) or resumed at the checkpoint's rows."""
    scfg, lca_on, device = cfg["store"], b.engine is not None, b.index.device
    writer = RunWriter(
        path,
        param_names=b.pnames,
        param_shapes=[tuple(b.named[n].shape) for n in b.pnames],
        param_layer=b.param_layer,
        layer_names=[g[0] for g in b.groups],
        attrs=attrs,
        per_param=plan.per_param,
        trajectory=bool(scfg["trajectory"]) and lca_on,
        flush_every=int(scfg["flush_every"]),
        expected_rows=plan.n_rows,
        n_classes=b.data.n_classes if b.per_class and lca_on else None,
        background=device.type == "cuda",  # rows leave the GPU without stalling it (writer thread)
        file_process=device.type == "cuda",  # and HDF5 is written by a child process, outside our GIL
        overwrite=mode == "restart",
        resume=ck["rows"] if ck is not None else None,
    )
    if mode == "restart":
        tqdm.write(f"WARNING: {path} had no checkpoint: starting it again from iteration 0 (resume=true)")
    return writer


class _Trainer:
    """The training side of the loop: each epoch's batch order, the learning-rate schedule, one step.

    ``perm`` [N] int64 (on the device) is the current epoch's order of the training examples, drawn from
    ``batch_gen`` (CPU generator seeded with ``seed``) when the epoch starts.
    """

    def __init__(self, cfg: dict[str, Any], b: Built, per_epoch: int):
        self.model, self.optimizer, self.data, self.loss_fn = b.model, b.optimizer, b.data, b.loss_fn
        self.batch_size, self.per_epoch, self.epochs = int(cfg["batch_size"]), per_epoch, int(cfg["epochs"])
        ocfg = cfg["opt"]
        self.milestones = [int(e) * per_epoch for e in (ocfg.get("lr_decay_epochs") or [])]
        self.decay = float(ocfg.get("lr_decay_factor", 0.1))
        self.seed, self.shard = int(cfg["seed"]), b.shard
        self.batch_gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.perm: torch.Tensor | None = None
        # the mean over counted targets, -100 left out (cross-entropy skips them itself)
        self.mask = self.data.train.has_ignored and getattr(self.loss_fn, "ignore_index", None) != -100
        self.resumed_perm: torch.Tensor | None = None  # the checkpoint's epoch order [N] (CPU)

    def epoch_orders(self) -> np.ndarray:
        """The training order of every epoch, ``[epochs, N]`` (int32 where N allows): row e is the order in
        which epoch e visits the training examples (batches are its consecutive ``batch_size`` slices).
        Drawn from a fresh generator seeded as ``batch_gen``: the orders :meth:`iterations` draws."""
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        n = self.data.n_train
        orders = torch.stack([torch.randperm(n, generator=g) for _ in range(self.epochs)])
        return orders.numpy().astype(np.int32 if n < 2**31 else np.int64)

    def iterations(self, start: int) -> Iterator[int]:
        """Iterations ``start`` … end of the last epoch; ``perm`` is the current epoch's order."""
        device, n_train = self.data.device, self.data.n_train
        it = start
        for epoch in range(start // self.per_epoch, self.epochs):
            b0 = it - epoch * self.per_epoch  # > 0 only when resuming in the middle of an epoch
            if b0 > 0:
                self.perm = self.resumed_perm.to(device)
            else:
                self.perm = torch.randperm(n_train, generator=self.batch_gen).to(device)
            for _ in range(b0, self.per_epoch):
                yield it
                it += 1

    def step(self, it: int) -> torch.Tensor:
        """Training iteration ``it``: the schedule, then one optimizer step → the batch loss (0-d)."""
        if it in self.milestones:
            for g in self.optimizer.param_groups:
                g["lr"] *= self.decay
        apply_freezes(self.optimizer, it)
        b = it % self.per_epoch
        idx = self.perm[b * self.batch_size : (b + 1) * self.batch_size]
        self.optimizer.zero_grad(set_to_none=True)
        inputs, targets = self.data.train.take(idx)
        batch_loss = target_loss(self.loss_fn, call(self.model, inputs), targets, "mean", self.mask)
        batch_loss.backward()
        self.optimizer.step()
        # every rank took this step; rank 0's θ on all of them, bit for bit, whatever kernels ran
        if self.shard.active:
            broadcast_params_(self.model.parameters())
        return batch_loss


class _TrainLoop:
    """One run's loop: the trainer, the recorder of its LCA rows and the pipelined driver, with the
    checkpoint state of the three (:meth:`state`, :meth:`resume`)."""

    def __init__(self, cfg: dict[str, Any], b: Built, plan: _Plan, writer: RunWriter, tracker: Any):
        self.b, self.plan, self.writer, self.tracker = b, plan, writer, tracker
        self.device = b.index.device
        self.trainer = _Trainer(cfg, b, plan.per_epoch)
        reducer = LCAReducer(b.index, len(b.groups), b.engine.layer_sums if b.engine is not None else None)
        self.start_it, self.desc = 0, f"{b.label}/{b.data.source}"
        scfg = cfg["store"]
        self.recorder = StepRecorder(
            reducer, writer, per_param=plan.per_param, trajectory=bool(scfg["trajectory"]),
            tracker=tracker, layer_names=[g[0] for g in b.groups],
        )  # fmt: skip
        self.driver = LCADriver(
            b.engine,
            self.recorder,
            self.flat,
            (plan.lo, plan.hi),
            plan.theta_only,
            pipelined=not b.shard.active,
        )
        if isinstance(b.engine, SubsetEngine):
            b.engine.next_t = plan.lo  # the subsets' seeds are per training iteration
            self.recorder.estimator = b.engine

    def flat(self) -> torch.Tensor:
        """θ: a fresh flat [K] copy of the trainable parameters."""
        return torch.cat([self.b.named[n].detach().reshape(-1) for n in self.b.pnames])

    def state(self, it: int, config: str) -> dict[str, Any]:
        """The checkpoint at the boundary before iteration ``it``: everything the loop carries on."""
        rec = self.recorder.state_dict()
        return {
            "config": config,
            "iteration": it,
            "rows": self.writer.committed_rows(),
            "model": self.b.model.state_dict(),
            "optimizer": self.b.optimizer.state_dict(),
            "reducer": rec["reducer"],
            "batch_gen": self.trainer.batch_gen.get_state(),
            "perm": self.trainer.perm.cpu(),
            "rng": rng_state(self.device),
            "loop": rec["loop"],
            **({"estimate": self.b.engine.state_dict()} if isinstance(self.b.engine, SubsetEngine) else {}),
        }

    def resume(self, ck: dict[str, Any], created: str) -> None:
        """Everything the loop carries from one iteration to the next, as it was at the checkpoint."""
        self.start_it = int(ck["iteration"])
        self.b.model.load_state_dict(ck["model"])
        self.b.optimizer.load_state_dict(ck["optimizer"])
        self.recorder.load_state_dict(ck)
        self.trainer.batch_gen.set_state(ck["batch_gen"])
        self.trainer.resumed_perm = ck["perm"]
        set_rng_state(ck["rng"], self.device)
        resumed = {"resumed": f"from iteration {self.start_it} at {created}"}  # the latest resume
        self.writer.set_attrs({**resumed, **(getattr(self.tracker, "attrs", None) or {})})  # and its W&B run
        if isinstance(self.b.engine, SubsetEngine) and "estimate" in ck:
            self.b.engine.load_state_dict(ck["estimate"])
        if self.b.engine is not None and self.plan.lo < self.start_it < self.plan.hi:
            self.driver.resume()
        if self.b.shard.rank == 0:  # one message per run
            where = f"{self.writer.path} from its checkpoint at iteration {self.start_it}"
            tqdm.write(f"resuming {where} of {self.plan.total_iters}")

    def run(self, boundaries: list) -> None:
        """Train from ``start_it`` to the end, LCA pipelined (see :mod:`lca_lab.loop`)."""
        self.b.model.train()
        bar = self.recorder.bar = tqdm(
            total=self.plan.total_iters, initial=self.start_it, desc=self.desc, unit="it", dynamic_ncols=True,
            disable=self.b.shard.rank != 0,  # one progress bar per run
        )  # fmt: skip
        self.driver.train(
            self.trainer.iterations(self.start_it),
            self.trainer.step,
            boundaries,
            after=lambda it, launched: bar.update(1),
        )
        bar.close()


@dataclass
class _Eval:
    """Test loss and accuracy every ``every`` iterations (not at the end: :func:`_finish` evaluates)."""

    loop: _TrainLoop
    every: int

    def due(self, it: int) -> bool:
        return (
            it % self.every == 0 and it != self.loop.plan.total_iters
        )  # drained: the tracker's steps increase

    def __call__(self, it: int) -> None:
        data, chunk = self.loop.b.data, self.loop.b.chunk
        tl, ta = evaluate(self.loop.b.model, data.test, None, chunk, self.loop.b.loss_fn)
        self.loop.writer.append_eval(it, test_loss=tl, test_acc=ta)
        if self.loop.tracker is not None:
            self.loop.tracker.log_eval(it, test_loss=tl, test_acc=ta)


@dataclass
class _KillTest:
    """Test hook (``LCA_LAB_TEST_SIGKILL_AT_ITERATION``): SIGKILL once ``at`` iterations are done, their
    rows buffered or flushed, before any checkpoint at that boundary."""

    at: int

    def due(self, it: int) -> bool:
        return it == self.at

    def __call__(self, it: int) -> None:
        # LCA_LAB_TEST_SIGNAL=SIGSTOP: a rank that hangs instead of dying
        os.kill(os.getpid(), getattr(signal, os.environ.get("LCA_LAB_TEST_SIGNAL", "SIGKILL")))


def _kill_test(rank: int) -> _KillTest:
    """The test hook of this rank (``LCA_LAB_TEST_SIGKILL_RANK``, default 0, picks the rank it kills)."""
    at = int(os.environ.get(TEST_KILL_ENV, "-1"))
    return _KillTest(at if rank == int(os.environ.get("LCA_LAB_TEST_SIGKILL_RANK", "0")) else -1)


@dataclass
class _Checkpoint:
    """Flush the run file and save the loop's state every ``every`` iterations, every ``seconds`` s,
    and on a preemption signal (never at the end: a complete run needs none)."""

    loop: _TrainLoop
    run_dir: Path
    config: str
    signals: PreemptionSignals
    every: int
    seconds: float
    last: float = field(default_factory=time.monotonic)

    def due(self, it: int) -> bool:
        if it >= self.loop.plan.total_iters:
            return False
        timed = self.seconds and time.monotonic() - self.last >= self.seconds
        return bool((self.every and it % self.every == 0) or timed or self.signals.signum is not None)

    def __call__(self, it: int) -> None:
        save_checkpoint(self.run_dir, self.loop.state(it, self.config))
        self.last = time.monotonic()


@dataclass
class _Preempt:
    """After a preemption signal's checkpoint: mark the run file ``preempted`` and stop (RunPreempted)."""

    loop: _TrainLoop
    run_dir: Path
    signals: PreemptionSignals

    def due(self, it: int) -> bool:
        return self.signals.signum is not None and it < self.loop.plan.total_iters

    def __call__(self, it: int) -> None:
        self.loop.recorder.bar.close()
        name = signal.Signals(self.signals.signum).name
        self.loop.writer.close(f"preempted: {name} at iteration {it}; rerun to continue")
        prev = self.signals.previous.get(self.signals.signum)
        raise RunPreempted(self.signals.signum, it, self.run_dir, prev)


def _boundaries(
    cfg: dict[str, Any], loop: _TrainLoop, plan: _Plan, run_dir: Path, config: str, signals: Any, ck_on: bool
) -> list:
    """What runs between iterations, in this order: evaluation, kill test, checkpoint, preemption."""
    out: list = [_Eval(loop, int(cfg["eval_every"])), _kill_test(0)]
    if ck_on:
        ckcfg = cfg.get("checkpoint") or {}
        every, seconds = int(ckcfg.get("every") or 0), float(ckcfg.get("seconds") or 0)
        out += [_Checkpoint(loop, run_dir, config, signals, every, seconds), _Preempt(loop, run_dir, signals)]
    return out


def _finish(loop: _TrainLoop, plan: _Plan, device: str) -> dict[str, Any]:
    """The final evaluation, the reducer's counters and the summary (also the run file's ``summary/*``)."""
    b, writer, tracker = loop.b, loop.writer, loop.tracker
    train_loss, train_acc = evaluate(b.model, b.data.train, None, b.chunk, b.loss_fn)
    test_loss, test_acc = evaluate(b.model, b.data.test, None, b.chunk, b.loss_fn)
    final = {"test_loss": test_loss, "test_acc": test_acc, "train_loss": train_loss, "train_acc": train_acc}
    writer.append_eval(plan.total_iters, **final)
    if tracker is not None:
        tracker.log_eval(plan.total_iters, **final)
    summary: dict[str, Any] = {
        "run_file": str(writer.path),
        "data_source": b.data.source,
        "device": device,
        "iterations": plan.total_iters,
        "lca_rows": plan.n_rows,
        "final_train_loss_eval": train_loss,
        "final_train_acc": train_acc,
        "final_test_loss": test_loss,
        "final_test_acc": test_acc,
    }
    if plan.n_rows:
        loop.recorder.write_counters()
        if isinstance(b.engine, SubsetEngine):  # the run totals' standard errors (lca_lab.estimate)
            total_se, layer_se = b.engine.run_se()
            writer.write_array("estimate/run_layer_se", layer_se)
            writer.write_array("estimate/run_total_se", np.array([total_se]))
        summary.update(loop.recorder.summary(plan.n_rows))
    summary.update(_timing(loop.driver.iter_s, b.engine))
    for k, v in summary.items():
        if isinstance(v, (int, float, str)):
            writer.set_attr(f"summary/{k}", v)
    return summary


def _timing(iter_s: list[float], engine: LCAEngine | None) -> dict[str, Any]:
    """Median time per LCA iteration in this process, and why a speed setting asked for did not run."""
    out: dict[str, Any] = {}
    if iter_s:
        out["lca_s_per_iter"] = statistics.median(iter_s)
        out["lca_iters_timed"] = len(iter_s)
    if engine is not None and engine.loss.graph_error:  # asked for, but the eager path ran
        out["cuda_graph_error"] = engine.loss.graph_error
    if engine is not None and engine.loss.compile_error:  # likewise for torch.compile
        out["compile_error"] = engine.loss.compile_error
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable end-of-run report."""
    lines = [
        "",
        f"data source       : {s['data_source']}   device: {s['device']}   iterations: {s['iterations']}",
        f"final train loss  : {s['final_train_loss_eval']:.4f}   acc {100 * s['final_train_acc']:.2f}%"
        "  (eval mode)",
        f"final test loss   : {s['final_test_loss']:.4f}   acc {100 * s['final_test_acc']:.2f}%",
    ]
    if s.get("lca_rows"):
        lines += [
            f"LCA rows          : {s['lca_rows']}   L: {s['L_start']:.4f} → {s['L_end']:.4f}",
            f"entries helping   : {100 * s['frac_helping']:.2f}%   hurting {100 * s['frac_hurting']:.2f}%"
            f"   zero {100 * s['frac_zero']:.2f}%  (mean over iterations)",
            f"helping, zeros ignored (paper's Table 1): {s['pct_helping_nonzero']:.2f}%"
            + ("  (from subset estimates: biased down, docs/estimates.md)" if s.get("lca_estimate") else ""),
            "LCA per layer (nats, negative = helped):",
        ]
        width = max(len(n) for n in s["layer_lca"])
        if s.get("lca_estimate") == "subset":  # subset estimates: their sampling's 95 % intervals
            se, q = s["layer_lca_se"], s.get("lca_interval_q", 1.96)
            lines[-1] = f"LCA per layer (nats, negative = helped; subset estimates ± {q:.3g} SE, 95 %):"
            lines += [f"  {n:<{width}} {v:+.5f} ± {q * se[n]:.5f}" for n, v in s["layer_lca"].items()]
            lines.append(f"  {'total':<{width}} {s['lca_total']:+.5f} ± {q * s['lca_total_se']:.5f}")
        else:
            lines += [f"  {n:<{width}} {v:+.5f}" for n, v in s["layer_lca"].items()]
        lines += [
            f"max |Σ LCA − ΔL| per iteration : {s['max_abs_error']:.2e} nats"
            f"   (rows over lca.tolerance: {s['not_converged']})",
            f"cumulative error              : {s['cumulative_error']:+.2e} nats = "
            f"{100 * s['cumulative_rel_error']:.3f}% of |L_T − L_0|",
            f"mean splits {s['mean_splits']:.2f}, "
            f"gradient passes per iteration {s['grad_passes_per_iter']:.2f}"
            + (" (over the subset)" if s.get("lca_estimate") == "subset" else ""),
        ]
    if s.get("lca_s_per_iter"):
        lines.append(
            f"time per LCA iteration         : median {1e3 * s['lca_s_per_iter']:.2f} ms over "
            f"{s['lca_iters_timed']} in this process (training step, LCA, reducers, storage)"
        )
    lines.append(f"run file          : {s['run_file']}")
    return "\n".join(lines)
