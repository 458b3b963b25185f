"""Offline and sharded LCA from a stored trajectory: ``python -m lca_lab.recompute RUN_DIR``.

A run trained with ``store.trajectory=true`` (LCA on or off) keeps θ_t, float32 [K], for every iteration
t of its LCA window. This module rebuilds the run's data, network and LCA engine from the run file's
``config`` attribute and computes LCA along the stored path, either whole or, with ``shard=i
num_shards=n``, for one of n contiguous ranges of steps, so that a Hydra multirun spreads one long run
over several GPUs or nodes::

    python -m lca_lab.recompute RUN_DIR                                   # one process
    python -m lca_lab.recompute -m run_dir=RUN_DIR shard=0,1 num_shards=2 hydra/launcher=submitit_local
    python -m lca_lab.recompute RUN_DIR shard=1 num_shards=2              # rerun one shard
    python -m lca_lab.recompute RUN_DIR merge=true                        # assemble (normally automatic)

Files, in ``<run_dir>/recompute/`` (``out_dir=`` to change):

``shard-II-of-NN.h5``
    One shard, in the run-file layout (``train/loss`` [T_i+1], ``lca/*`` [T_i], ``reduce/*`` per row,
    ``recompute/passes`` [T_i]), plus the reducer's per-parameter counters and the signs needed to join
    them across shard boundaries (``reduce_state/*``). Written as ``shard-II-of-NN.partial.h5`` and
    renamed when complete, so the final name exists only for a complete shard; a rerun replaces it.
``lca.h5``
    The merged run file (the contract of ``lca_lab.store``): attrs of the training run with the ``config``'s
    ``lca`` section set to the settings used, ``params/*``, ``layers/*``, ``train/loss``, ``lca/*``,
    ``reduce/*`` (counters joined exactly as one uninterrupted stream would have counted),
    ``eval/*`` and ``data/train_index`` copied from the training run, ``summary/*`` attrs, ``status``.
    Written by whichever shard finishes last (under an exclusive ``fcntl.flock`` on ``.merge.lock``, so
    two shards finishing together merge once), or by ``merge=true``.

The result equals the online computation for the same trajectory: the engine sees the same float32 θ
values, primes at the first θ of its range (the online run reuses the same gradient), and takes the
same refinement decisions. ``recompute_range`` is the only function that computes; replace its body
(e.g. by a batched implementation over many path points) without touching the rest.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import __version__
from .config import ConfigError, check_lca_overrides, run_cli, validate_recompute
from .dist import SINGLE, NoWriter, Shard, rank_device, world_from_env
from .dist import init as init_dist
from .estimate import interval_q, run_df
from .lca import (
    FullBatchLoss,
    LayerSums,
    LCAEngine,
    StepLCA,
    auto_chunk_size,
    check_engine_options,
    has_batchnorm,
    set_matmul_precision,
)
from .loop import Launched, LCADriver, RunningSums, StepRecorder, lca_summary
from .parts import build_parts, check_parts, check_targets, upgrade_config
from .reducers import LCAReducer
from .schema import RecomputeConfig
from .speed import PassSettings, SpeedError, check_settings, pass_settings
from .store import RunWriter, estimate_bytes, open_run, resolve_path
from .store.sizing import resolve_per_param
from .subset_engine import SubsetEngine, subset_attrs, subset_engine

__all__ = [
    "RecomputeError",
    "Trajectory",
    "compute_shard",
    "merge_shards",
    "recompute",
    "recompute_range",
    "shard_bounds",
    "shard_path",
]

MERGED_NAME = "lca.h5"
LOCK_NAME = ".merge.lock"
ENGINE_KEYS = (
    "method", "tolerance", "max_splits", "adaptive", "chunk_size", "per_class", "test", "batch_points",
    "precision", "cuda_graph", "cudnn_benchmark", "compile", "estimate", "subset", "subset_fixed",
    "subset_seed",
)  # fmt: skip
REDUCE_ROW = ("frac_helping", "frac_hurting", "frac_zero", "layer_frac_helping", "layer_frac_hurting")
# Per-row series whose first row is the start point (T+1 rows): a later shard's first row repeats the
# previous shard's last one and is dropped when merging.
POINT_SERIES = ("train/loss", "class/loss", "test/loss")
ROW_SERIES = (
    *(f"reduce/{n}" for n in REDUCE_ROW),
    "lca_test/layer",
    "lca_test/total",
    "lca_test/error",
    "recompute/passes",
    "lca/total_se",  # subset estimates (lca_lab.estimate)
    "lca/layer_se",
    "estimate/seed",
    "estimate/passes",
    "estimate/cov_prev",  # overlapping halves: covariance with the previous row (0 at a shard's first row)
)
READ_BLOCK = 64  # θ rows read from the run file at a time


class RecomputeError(ValueError):
    """Input that cannot be recomputed or merged; the message names the fix."""


# ----------------------------------------------------------------------------------------------------------
# the computation


def recompute_range(
    engine: LCAEngine | SubsetEngine,
    thetas: Callable[[int], torch.Tensor],
    lo: int,
    hi: int,
    batch_points: int = 1,
    iterations: Sequence[int] | None = None,
) -> Iterator[tuple[int, StepLCA]]:
    """LCA of the stored steps ``lo..hi-1``: yields ``(r, StepLCA of θ_r → θ_{r+1})`` in order.

    Args:
        engine: the run's engine (its loss, method, tolerance, per-class and test settings).
        thetas: ``thetas(r)`` → θ_r, flat [K] tensor in the model's dtype on the engine's device, for
            trajectory rows ``r = lo..hi`` (row r is θ after r stored steps, not a training iteration).
        lo, hi: step range, ``0 ≤ lo < hi ≤ n_steps``.
        batch_points: path points evaluated together (``LCAEngine.steps``: vmap over the points of up
            to this many steps, refinements batched too); 1 is the online engine's step-by-step path.
        iterations: the training iteration of every trajectory row (``trajectory/iteration``): a
            :class:`~lca_lab.subset_engine.SubsetEngine` draws the subset of row r's step by its iteration, as
            the training run did (default: r).

    The first point is primed (one extra gradient pass); afterwards every endpoint gradient is reused,
    exactly as online. The caller must not modify yielded tensors' inputs in place.
    """
    subset = isinstance(engine, SubsetEngine)
    if subset:
        engine.next_t = int(iterations[lo]) if iterations is not None else lo
    engine.prime(thetas(lo))
    if batch_points <= 1 or subset:
        theta0 = thetas(lo)
        for r in range(lo, hi):
            theta1 = thetas(r + 1)
            if subset:
                engine.next_t = int(iterations[r]) if iterations is not None else r
            yield r, engine.step(theta0, theta1)  # same tensor object next time: the engine reuses g(θ1)
            theta0 = theta1
        return
    points = (thetas(r) for r in range(lo, hi + 1))
    yield from zip(range(lo, hi), engine.steps(points, batch_points))


def shard_bounds(n_steps: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Step range ``[lo, hi)`` of shard ``shard`` of ``num_shards`` over ``n_steps`` steps (near-equal)."""
    return shard * n_steps // num_shards, (shard + 1) * n_steps // num_shards


def shard_path(out_dir: Path, shard: int, num_shards: int, partial: bool = False) -> Path:
    w = max(2, len(str(num_shards - 1)))
    return Path(out_dir) / f"shard-{shard:0{w}d}-of-{num_shards:0{w}d}{'.partial' if partial else ''}.h5"


def default_out_dir(run_dir: str | os.PathLike) -> Path:
    """``<run dir>/recompute`` (the directory holding the run file)."""
    return resolve_path(run_dir).parent / "recompute"


# ----------------------------------------------------------------------------------------------------------
# the stored trajectory


@dataclass
class Trajectory:
    """Where θ lives in a run file.

    Attributes:
        path: the run file.
        iterations: [n_steps + 1] int64, training iteration t of each θ row (θ_t = θ after t updates).
        n_steps: number of stored steps (θ rows − 1).
    """

    path: Path
    iterations: np.ndarray

    @property
    def n_steps(self) -> int:
        return len(self.iterations) - 1

    @classmethod
    def from_run(cls, path: str | os.PathLike) -> Trajectory:
        """Read the layout of a run's trajectory; refuse a run without one (naming the fix)."""
        p = resolve_path(path)
        if not p.exists():
            raise RecomputeError(f"no run file at {p}: give a run directory holding lca.h5 (or the run file)")
        with open_run(p) as rf:
            f = rf.h5
            loop = rf.attrs.get("lca_loop")
            if loop:  # track() or a trainer's callback: no config rebuilds its model, data and loss
                raise RecomputeError(
                    f"{p} was made inside a training loop of its own (lca_loop={loop}): its model, data and "
                    "loss are not in a config that python -m lca_lab.recompute can rebuild; compute the LCA "
                    "of its stored trajectory with lca_lab.lca.LCAEngine in Python (docs/integrations.md)"
                )
            if "trajectory/theta" not in f:
                raise RecomputeError(
                    f"{p} has no stored trajectory (trajectory/theta): offline LCA needs θ of every "
                    "iteration; train again with store.trajectory=true (LCA may be off: lca=off)"
                )
            if not rf.config:
                raise RecomputeError(f"{p} has no 'config' attribute: cannot rebuild its data and network")
            if "trajectory/iteration" in f:  # LCA was off: θ-only rows (loop.StepRecorder.theta_row)
                n = min(f["trajectory/theta"].shape[0], f["trajectory/iteration"].shape[0])
                iters = f["trajectory/iteration"][:n].astype(np.int64)
            else:  # LCA was on: θ rows aligned with train/loss, row r+1 after LCA row r's step
                it = rf.lca_iteration
                iters = np.concatenate([it[:1], it + 1]).astype(np.int64) if len(it) else it
            if len(iters) < 2:
                raise RecomputeError(
                    f"{p} holds {len(iters)} stored θ row(s): at least two (one training step) are needed"
                )
        return cls(p, iters)


class _ThetaReader:
    """``thetas(r)`` for :func:`recompute_range`: rows read in blocks, moved to the device once."""

    def __init__(self, f: h5py.File, device: torch.device, dtype: torch.dtype, lo: int, hi: int):
        self.ds, self.device, self.dtype, self.lo, self.hi = f["trajectory/theta"], device, dtype, lo, hi
        self._start, self._block = -1, None

    def __call__(self, r: int) -> torch.Tensor:
        if not self.lo <= r <= self.hi:
            raise IndexError(f"θ row {r} outside this shard's rows {self.lo}..{self.hi}")
        if self._block is None or not self._start <= r < self._start + len(self._block):
            self._start = r
            rows = self.ds[r : min(r + READ_BLOCK, self.hi + 1)]
            self._block = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device, self.dtype)
        return self._block[r - self._start]


# ----------------------------------------------------------------------------------------------------------
# rebuilding the run's engine


def _resolve_device(name: str) -> torch.device:
    from .train import resolve_device  # late: train imports much more than this module needs

    return resolve_device(name)


def engine_settings(run_cfg: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The run's ``lca`` settings with non-null ``overrides`` applied; checked (RecomputeError)."""
    lcfg = dict(run_cfg.get("lca") or {})
    out = {k: lcfg.get(k) for k in ENGINE_KEYS if k != "batch_points"}  # a recompute-only setting
    out["batch_points"] = None
    out["per_class"] = bool(out["per_class"] or False)
    out["test"] = bool(out["test"] or False)
    out["adaptive"] = True if out["adaptive"] is None else bool(out["adaptive"])
    for k, v in (overrides or {}).items():
        if k not in ENGINE_KEYS:
            raise RecomputeError(f"lca.{k} cannot be set for a recompute; settable: {list(ENGINE_KEYS)}")
        if v is not None:
            out[k] = v
    try:  # types, choices and ranges: the lca section of the typed schema (lca_lab.schema)
        check_lca_overrides(out)
        check_engine_options(str(out["method"]), float(out["tolerance"]), int(out["max_splits"]))
    except (TypeError, ValueError) as e:
        raise RecomputeError(str(e)) from None
    out["precision"] = out["precision"] or "fp32"
    out["tolerance"], out["max_splits"] = float(out["tolerance"]), int(out["max_splits"])
    for key in ("cuda_graph", "cudnn_benchmark", "compile"):
        # missing (older run files): off, as they ran; auto: decided for the recompute's device (_build)
        out[key] = False if out[key] is None else out[key]
    try:
        check_settings(out, None, bool(run_cfg.get("deterministic", False)))
    except SpeedError as e:
        raise RecomputeError(str(e)) from None
    return out


def device_settings(settings: dict[str, Any], overrides: dict[str, Any] | None, device: torch.device) -> None:
    """Fit ``settings`` to the device, in place: CUDA graphs only on a GPU.

    A run trained with ``lca.cuda_graph=true`` may be recomputed on the CPU (the setting, a pure speed
    choice there, is dropped); asking for it here on the CPU is refused (RecomputeError naming the fix).
    """
    if settings["cuda_graph"] is not True or device.type == "cuda":
        return
    if (overrides or {}).get("cuda_graph") is True:
        raise RecomputeError(
            f"lca.cuda_graph=true records CUDA graphs, but this recompute runs on {device}; "
            "set lca.cuda_graph=false or device=cuda"
        )
    settings["cuda_graph"] = False


@dataclass
class _Setup:
    engine: LCAEngine | SubsetEngine
    index: torch.Tensor  # [K] int64 layer of each entry
    n_layers: int
    n_classes: int
    settings: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    speed: PassSettings  # how L's passes run (lca_lab.speed), resolved for the device


def _build(
    rf, run_cfg: dict[str, Any], settings: dict[str, Any], device: torch.device, ranks: Shard = SINGLE
) -> _Setup:
    """Data, net and engine of the run, checked against the run file before any compute."""
    # data on the device, the net seeded (its values are replaced by θ: only the architecture matters), loss
    parts = build_parts(run_cfg, device, optimizer=False, warn=lambda line: print(line, file=sys.stderr))
    data, model = parts.data, parts.model
    src = rf.attrs.get("data_source")
    if src is not None and data.source != src:
        raise RecomputeError(
            f"the run was trained on {src} but {data.source} loaded here: L would be a different function; "
            f"make {src} available (data.root / LCA_LAB_DATA) before recomputing"
        )
    idx = rf.train_index
    if idx is not None and not np.array_equal(idx, data.train_index):
        raise RecomputeError("the training split loaded here differs from the run's data/train_index")
    _check_fingerprint(rf.attrs.get("data_fingerprint"), data.fingerprint)
    named = dict(model.named_parameters())
    pnames, shapes = rf.param_names, rf.param_shapes
    bad = [n for n, s in zip(pnames, shapes) if n not in named or tuple(named[n].shape) != tuple(s)]
    if bad:
        raise RecomputeError(
            f"parameters {bad[:3]} of the run file do not match the network rebuilt from its config "
            f"(net._target_={run_cfg['net']['_target_']}); the run file and this lca_lab version disagree"
        )
    K = rf.n_params
    if rf.h5["trajectory/theta"].shape[1] != K:
        raise RecomputeError(
            f"trajectory/theta has {rf.h5['trajectory/theta'].shape[1]} columns, expected {K}"
        )
    layer_of = rf.param_layer
    index = torch.cat(
        [torch.full((int(np.prod(s)),), int(li), dtype=torch.int64) for s, li in zip(shapes, layer_of)]
    ).to(device)
    chunk = settings["chunk_size"]
    if chunk == "auto":
        # BatchNorm nets: the training run's chunk, part of L's definition. Otherwise only speed depends
        # on it: resolve it for this device (a CPU run's small chunks would slow a GPU recompute down).
        recorded = rf.attrs.get("lca_chunk_size")
        if has_batchnorm(model) and recorded:
            chunk = int(recorded)
        else:
            chunk = auto_chunk_size(model, data.n_train, device, data.train.head(4))
    chunk = int(chunk)
    set_matmul_precision(settings["precision"])
    per_class = settings["per_class"]
    # How L's passes run (layout, graphs, cuDNN autotuning, compile; auto decided for this device, and
    # CUDA graphs not where batched points would replace them): its value only to float rounding.
    bp = settings["batch_points"]
    batched = device.type == "cuda" and not has_batchnorm(model) and (bp is None or bp > 1)
    speed = pass_settings(model, device, settings, bool(run_cfg.get("deterministic", False)), batched=batched)
    settings = {**settings, "cuda_graph": speed.cuda_graph}  # the passes' own (read by the shard's loop)
    fast = speed.engine_kwargs()
    fbl = FullBatchLoss(
        model, data.train, None, chunk, loss_fn=parts.loss_fn, param_names=pnames,
        n_classes=data.n_classes if per_class else None, shard=ranks, **fast,
    )  # fmt: skip
    test_fbl = None
    if settings["test"] and len(data.test) > 0:
        test_fbl = FullBatchLoss(
            model, data.test, None, chunk, loss_fn=parts.loss_fn, param_names=pnames, shard=ranks, **fast
        )
    engine = LCAEngine(
        fbl, settings["method"], settings["tolerance"], settings["max_splits"], settings["adaptive"],
        per_class=per_class, test_loss=test_fbl, layer_sums=LayerSums(index, len(rf.layer_names)),
    )  # fmt: skip
    if settings.get("estimate") == "subset":
        if ranks.active:
            raise RecomputeError(
                "lca.estimate=subset runs in one process; drop torchrun or use lca.estimate=exact"
            )
        try:
            engine = subset_engine(fbl, engine, settings, int(run_cfg.get("seed", 0)))
        except ValueError as e:
            raise RecomputeError(str(e)) from None
    return _Setup(engine, index, len(rf.layer_names), data.n_classes, settings, fbl.dtype, device, speed)


def _check_fingerprint(recorded: Any, loaded: dict[str, Any]) -> None:
    """Refuse data whose splits differ from the run's (sizes or sha256 of inputs and targets)."""
    if not recorded:
        return  # run files written before fingerprints were recorded
    rec = json.loads(recorded) if isinstance(recorded, str) else dict(recorded)
    for split in ("train", "test"):
        a, b = rec.get(split), loaded.get(split)
        if a and b and (a.get("n"), a.get("sha256")) != (b.get("n"), b.get("sha256")):
            raise RecomputeError(
                f"the {split} split loaded here ({b.get('n')} examples, sha256 {str(b.get('sha256'))[:12]}…) "
                f"is not the run's ({a.get('n')} examples, sha256 {str(a.get('sha256'))[:12]}…): L would be "
                "a different function; give the run's data (same files, data.* and split_seed)"
            )


def read_run_config(
    text: str, source: Any, allow_targets: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    r"""A run file's ``config`` attribute as a dict in today's shape (:func:`lca_lab.parts.upgrade_config`),
    its ``_target_``\ s checked against the allowlist plus ``allow_targets``
    (:func:`lca_lab.parts.check_targets`) and its parts' arguments against their signatures
    (:func:`lca_lab.parts.check_parts`), before anything is imported from it. ``ConfigError`` names the
    key and the fix."""
    run_cfg = upgrade_config(yaml.safe_load(text) or {})
    check_targets(run_cfg, allow_targets, source)
    check_parts(run_cfg)
    return run_cfg


def _per_param(run_cfg: dict[str, Any], per_param: bool | None, rf: Any, n_steps: int) -> bool:
    """Per-parameter rows in the recomputed files: ``per_param`` when given, else the training run's
    ``store.per_param``; its ``auto`` keeps them when the merged file of all ``n_steps`` rows fits the
    run's ``store.max_gb`` (every shard decides alike), saying so in one line when it does not."""
    store = run_cfg.get("store") or {}
    setting = store.get("per_param", True) if per_param is None else bool(per_param)
    K, n_layers = sum(int(np.prod(s)) for s in rf.param_shapes), len(rf.layer_names)

    def size_of(p: bool) -> int:  # bytes of the merged file, the reducers' four [K] int32 counters included
        return estimate_bytes(K, n_steps, p, False, n_layers) + 16 * K

    pp, note = resolve_per_param(setting, float(store.get("max_gb", 20)), size_of, keep="per_param=true")
    if note:
        print(note, file=sys.stderr)
    return pp


def _recompute_config(run_cfg: dict[str, Any], settings: dict[str, Any], per_param: bool) -> dict[str, Any]:
    """The run's config as the recomputed file describes it: LCA on, with the settings used."""
    cfg = json.loads(json.dumps(run_cfg))  # deep copy of plain data
    cfg.setdefault("lca", {}).update({"enabled": True, **settings})
    cfg.setdefault("store", {}).update({"per_param": per_param, "trajectory": False})
    return cfg


def _recompute_overrides(train_overrides: Any, lca: dict[str, Any] | None) -> dict[str, str]:
    """The ``overrides`` attribute of a recomputed file (analysis labels its groups with it): the training
    command's, less its LCA settings (``lca=off`` would mislabel the result), plus the recompute's own
    ``lca.*`` settings; ``{}`` when the training run had none (a run not started from the CLI)."""
    if not train_overrides:
        return {}
    kept = [o for o in json.loads(train_overrides) if not o.lstrip("+~").startswith(("lca=", "lca."))]
    given = {k: v for k, v in (lca or {}).items() if v is not None}
    ours = [f"lca.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in given.items()]
    return {"overrides": json.dumps(kept + ours)}


# ----------------------------------------------------------------------------------------------------------
# one shard


def compute_shard(
    run_dir: str | os.PathLike,
    shard: int = 0,
    num_shards: int = 1,
    *,
    lca: dict[str, Any] | None = None,
    device: str = "auto",
    per_param: bool | None = None,
    out_dir: str | os.PathLike | None = None,
    flush_every: int = 50,
    progress: bool = True,
    allow_targets: list[str] | tuple[str, ...] = (),
    ranks: Shard = SINGLE,
) -> Path:
    r"""Compute LCA for shard ``shard`` of ``num_shards`` of a run's trajectory; return the shard file.

    The run's stored config (:func:`read_run_config`) may come from someone else: its ``_target_``\ s
    are built only when they match ``lca_lab.*``, ``torch.*``, ``torchvision.*`` or a pattern of
    ``allow_targets`` (the caller's; the file's own list is not trusted). Every input is checked before
    any compute. The shard is written as ``*.partial.h5`` and renamed
    to its final name only when complete (a failed shard leaves ``status = failed: …`` in the partial).
    ``ranks``: this process's rank when a torchrun launch shares the shard's passes (:mod:`lca_lab.dist`);
    rank 0 writes the shard file, the other ranks compute their share and write nothing.
    """
    traj = Trajectory.from_run(run_dir)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise RecomputeError(f"num_shards must be an integer ≥ 1, got {num_shards!r}")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise RecomputeError(
            f"shard must be an integer in 0..{num_shards - 1} (num_shards={num_shards}), got {shard!r}"
        )
    if num_shards > traj.n_steps:
        raise RecomputeError(
            f"num_shards={num_shards} is more than the {traj.n_steps} stored steps; "
            f"use num_shards ≤ {traj.n_steps}"
        )
    out = Path(out_dir) if out_dir else default_out_dir(traj.path)
    lo, hi = shard_bounds(traj.n_steps, shard, num_shards)
    dev = _resolve_device(device)
    with open_run(traj.path) as rf:
        run_cfg = read_run_config(rf.config, traj.path, allow_targets)
        settings = engine_settings(run_cfg, lca)
        device_settings(settings, lca, dev)
        pp = _per_param(run_cfg, per_param, rf, traj.n_steps)
        setup = _build(rf, run_cfg, settings, dev, ranks)
        src_attrs = rf.attrs
        layer_names, pnames, shapes, player = rf.layer_names, rf.param_names, rf.param_shapes, rf.param_layer
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecomputeError(f"cannot create {out} ({e.strerror or e}); choose out_dir=PATH") from None
        attrs = {
            **{k: v for k, v in src_attrs.items() if not k.startswith(("summary/", "recompute/"))},
            "config": yaml.safe_dump(_recompute_config(run_cfg, settings, pp), sort_keys=False),
            **_recompute_overrides(src_attrs.get("overrides"), lca),
            "lca_lab_version": __version__,
            "torch_version": torch.__version__,
            "device": str(dev),
            **setup.speed.attrs(),  # lca_channels_last, …: as resolved here, not the training run's
            # exact, or subset and the subset's size (lca_lab.estimate), as computed here
            **(
                subset_attrs(setup.engine)
                if isinstance(setup.engine, SubsetEngine)
                else {"lca_estimate": "exact"}
            ),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "recompute/source": str(traj.path.resolve()),
            "recompute/source_created": str(src_attrs.get("created", "")),
            "recompute/settings": json.dumps(settings, sort_keys=True),
            "recompute/shard": shard,
            "recompute/num_shards": num_shards,
            "recompute/steps": f"{lo}:{hi}",
            "recompute/n_steps": traj.n_steps,
            "recompute/id": uuid.uuid4().hex,
        }
        partial = shard_path(out, shard, num_shards, partial=True)
        if ranks.rank != 0:  # the same passes, rows to rank 0 only
            _write_shard_rows(NoWriter(), setup, rf.h5, traj, lo, hi, False, False, "")
            return shard_path(out, shard, num_shards)
        writer = RunWriter(
            partial, param_names=pnames, param_shapes=shapes, param_layer=player, layer_names=layer_names,
            attrs=attrs, per_param=pp, n_classes=setup.n_classes if settings["per_class"] else None,
            flush_every=flush_every, expected_rows=hi - lo, overwrite=True,
        )  # fmt: skip
        with writer:
            _write_shard_rows(writer, setup, rf.h5, traj, lo, hi, pp, progress, f"shard {shard}/{num_shards}")
    final = shard_path(out, shard, num_shards)
    os.replace(partial, final)  # atomic: the final name means complete
    return final


def _write_shard_rows(writer, setup: _Setup, f, traj: Trajectory, lo, hi, per_param, progress, desc) -> None:
    """LCA of the steps ``lo..hi-1`` into ``writer``, recorded as the training loop records its steps
    (:mod:`lca_lab.loop`), plus ``recompute/passes`` per row, the reducer's counters and the signs that
    join them across shard boundaries (``reduce_state/*``)."""
    reducer = LCAReducer(setup.index, setup.n_layers, setup.engine.layer_sums)
    bar = tqdm(total=hi - lo, desc=desc, unit="it", dynamic_ncols=True, disable=not progress)
    recorder = _ShardRecorder(
        reducer, writer, per_param=per_param, bar=bar, fresh=False, passes_row=True, divergence_hint=None
    )
    thetas = _ThetaReader(f, setup.device, setup.dtype, lo, hi)
    steps = (
        (int(traj.iterations[r]), st)
        for r, st in recompute_range(setup.engine, thetas, lo, hi, _points(setup), traj.iterations)
    )
    driver = LCADriver(setup.engine, recorder)
    driver.run(driver.computed(steps), after=lambda _launched: bar.update(1))
    bar.close()
    recorder.write_counters()
    state = {
        "first_motion": recorder.first_motion, "last_motion": reducer.last_motion,
        "first_grad": recorder.first_grad, "last_grad": reducer.last_grad,
    }  # fmt: skip
    for name, arr in state.items():
        writer.write_array(f"reduce_state/{name}", arr.cpu().numpy())


def _points(setup: _Setup) -> int:
    """Path points evaluated together: ``lca.batch_points``, or auto: batched where it pays (launch-bound
    GPU nets without BN: B× activations), unless CUDA graphs were asked for: they replay the
    point-by-point passes, not the vmap ones."""
    bp = setup.settings["batch_points"]
    if bp is not None:
        return bp
    batched = (
        setup.device.type == "cuda" and not setup.engine.loss.has_bn and not setup.settings["cuda_graph"]
    )
    return 64 if batched else 1


class _ShardRecorder(StepRecorder):
    """The loop's recorder, also keeping the first non-zero signs of Δθ and of the gradient in this range
    (``first_motion``, ``first_grad`` [K] int8): the merge joins the oscillation counters across shards."""

    def __init__(self, reducer: LCAReducer, writer: RunWriter, **kwargs: Any):
        super().__init__(reducer, writer, **kwargs)
        K, dev = reducer.index.numel(), reducer.index.device
        self.first_motion = torch.zeros(K, dtype=torch.int8, device=dev)
        self.first_grad = torch.zeros(K, dtype=torch.int8, device=dev)

    def record(self, step: Launched) -> StepLCA:
        st = super().record(step)
        self.first_motion = torch.where(
            self.first_motion != 0, self.first_motion, torch.sign(st.delta).to(torch.int8)
        )
        self.first_grad = torch.where(
            self.first_grad != 0, self.first_grad, torch.sign(st.grad0).to(torch.int8)
        )
        return st


# ----------------------------------------------------------------------------------------------------------
# merging


def _rerun_hint(run: Path, shard: int, n: int, settings: dict[str, Any] | None, out_dir: Path) -> str:
    where = run.parent if run.name == "lca.h5" else run
    cmd = f"python -m lca_lab.recompute {where} shard={shard} num_shards={n}"
    if out_dir != default_out_dir(run):
        cmd += f" out_dir={out_dir}"
    if settings:
        cmd += "".join(f" lca.{k}={v}" for k, v in sorted(settings.items()) if k in ("method", "tolerance"))
    return cmd


def _shard_counts(out_dir: Path) -> list[int]:
    pat = re.compile(r"shard-\d+-of-(\d+)(\.partial)?\.h5$")
    return sorted({int(m.group(1)) for p in out_dir.glob("shard-*.h5") if (m := pat.match(p.name))})


def _shard_status(out_dir: Path, num_shards: int) -> tuple[list[Path], list[tuple[int, str]]]:
    """(complete shard files in order, [(missing shard, why)])."""
    done, missing = [], []
    for i in range(num_shards):
        p = shard_path(out_dir, i, num_shards)
        if p.exists():
            done.append(p)
            continue
        part = shard_path(out_dir, i, num_shards, partial=True)
        why = "missing (never started)"
        if part.exists():
            try:
                with open_run(part) as rf:
                    why = f"incomplete (status {rf.status!r}, {rf.n_rows} rows)"
            except (OSError, KeyError) as e:
                why = f"incomplete (unreadable: {e})"
        missing.append((i, why))
    return done, missing


def merge_shards(
    run_dir: str | os.PathLike, num_shards: int | None = None, out_dir: str | os.PathLike | None = None
) -> Path:
    """Assemble complete shard files into one run file ``<out_dir>/lca.h5`` (written atomically).

    ``num_shards`` defaults to the one shard count present in ``out_dir``. Refuses (RecomputeError) while
    a shard is missing or incomplete, naming it and the command that reruns it, and when shards were
    computed from another run or with other settings.
    """
    run = resolve_path(run_dir)
    out = Path(out_dir) if out_dir else default_out_dir(run)
    if num_shards is None:
        counts = _shard_counts(out) if out.is_dir() else []
        if not counts:
            raise RecomputeError(
                f"no shard files in {out}: compute them first (python -m lca_lab.recompute {run_dir})"
            )
        if len(counts) > 1:
            raise RecomputeError(f"{out} holds shards of {counts} shard counts; say which with num_shards=N")
        num_shards = counts[0]
    done, missing = _shard_status(out, num_shards)
    cfg = None  # the settings of the complete shards, for the rerun command
    if done:
        with h5py.File(done[0], "r", locking=False) as f:
            cfg = json.loads(f.attrs["recompute/settings"])
    if missing:
        lines = [
            f"shard {i} of {num_shards} is {why}; rerun it with: {_rerun_hint(run, i, num_shards, cfg, out)}"
            for i, why in missing
        ]
        raise RecomputeError("cannot merge yet: " + " | ".join(lines))
    files = [open_run(p) for p in done]
    try:
        return _merge(run, out, files)
    finally:
        for rf in files:
            rf.close()


# Settings that change how fast L is evaluated, not its value (the same kernels): shards may differ in them.
SPEED_ONLY = ("cuda_graph",)


def _comparable(key: str, value: Any) -> Any:
    """A shard attribute as the merge compares it (settings without the speed-only ones)."""
    if key != "recompute/settings" or value is None:
        return value
    return {k: v for k, v in json.loads(value).items() if k not in SPEED_ONLY}


def _merge(run: Path, out: Path, shards: list) -> Path:
    a0 = shards[0].attrs
    for i, rf in enumerate(shards):
        a = rf.attrs
        for key in (
            "recompute/source",
            "recompute/settings",
            "recompute/n_steps",
            "recompute/source_created",
        ):
            if _comparable(key, a.get(key)) != _comparable(key, a0.get(key)):
                raise RecomputeError(
                    f"{rf.path.name} has {key}={a.get(key)!r} but {shards[0].path.name} has {a0.get(key)!r}: "
                    f"rerun it with the same settings ({_rerun_hint(run, i, len(shards), None, out)} ...)"
                )
        lo, hi = (int(x) for x in str(a["recompute/steps"]).split(":"))
        exp = shard_bounds(int(a0["recompute/n_steps"]), i, len(shards))
        if (lo, hi) != exp or rf.n_rows != hi - lo or rf.status != "complete":
            raise RecomputeError(
                f"{rf.path} covers steps {lo}:{hi} with {rf.n_rows} rows (status {rf.status}), expected "
                f"{exp[0]}:{exp[1]}; rerun it: {_rerun_hint(run, i, len(shards), None, out)}"
            )
    n_classes = shards[0].h5["lca/class_layer"].shape[1] if "lca/class_layer" in shards[0].h5 else None
    per_param = shards[0].per_param
    T = sum(rf.n_rows for rf in shards)
    attrs = {
        k: v
        for k, v in a0.items()
        if k not in ("status", "recompute/shard", "recompute/steps", "recompute/id")
    }
    attrs["recompute/shard_ids"] = json.dumps([rf.attrs["recompute/id"] for rf in shards])
    attrs["recompute/num_shards"] = len(shards)
    attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    partial = out / "lca.partial.h5"
    r0 = shards[0]
    writer = RunWriter(
        partial, param_names=r0.param_names, param_shapes=r0.param_shapes, param_layer=r0.param_layer,
        layer_names=r0.layer_names, attrs=attrs, per_param=per_param, n_classes=n_classes,
        flush_every=256, expected_rows=T, overwrite=True,
    )  # fmt: skip
    with writer:
        writer.write_initial(float(r0.train_loss[0]))
        for rf in shards:
            # Small per-row arrays whole; per-parameter rows [T, K] in blocks.
            its, loss, total, err = rf.lca_iteration, rf.train_loss[1:], rf.lca_total, rf.lca_error
            splits, conv, layer = rf.lca_splits, rf.lca_converged, rf.lca_layer
            cl = rf.lca_class_layer if n_classes else None
            for a in range(0, rf.n_rows, 256):
                b = min(a + 256, rf.n_rows)
                param = rf.param_lca(slice(a, b)) if per_param else None
                for j in range(a, b):
                    writer.append(
                        int(its[j]), loss[j], total[j], err[j], splits[j], bool(conv[j]), layer[j],
                        param[j - a] if per_param else None, class_layer=cl[j] if n_classes else None,
                    )  # fmt: skip
        writer.flush()
        for name in POINT_SERIES[1:] + ROW_SERIES:
            if name in r0.h5:
                parts = [rf.read(name)[: rf.n_rows + (1 if name in POINT_SERIES else 0)] for rf in shards]
                if name in POINT_SERIES:  # each later shard repeats the previous shard's last point
                    parts = parts[:1] + [p[1:] for p in parts[1:]]
                writer.write_array(name, np.concatenate(parts))
        for name, arr in _merge_reducers(shards).items():
            writer.write_array(f"reduce/{name}", arr)
        _copy_from_source(writer, Path(a0["recompute/source"]))
        for k, v in _summary(_merged_arrays(shards), a0.get("lca_subset_df")).items():
            writer.set_attr(f"summary/{k}", v)
    final = out / MERGED_NAME
    os.replace(partial, final)
    return final


def _merge_reducers(shards: list) -> dict[str, np.ndarray]:
    """Per-parameter counters of the whole range from the shards' counters.

    Helped/hurt counts add. A sign change across a shard boundary is counted by neither shard: it is
    added here from the last non-zero sign before the boundary (carried over shards where a parameter
    never moved) and the first non-zero sign after it, exactly as ``LCAReducer`` would have counted.
    """
    out: dict[str, np.ndarray] = {}
    for name in ("param_helped", "param_hurt"):
        out[name] = np.sum([rf.read(f"reduce/{name}").astype(np.int64) for rf in shards], axis=0).astype(
            np.int32
        )
    for name, key in (("motion_changes", "motion"), ("grad_sign_changes", "grad")):
        total = np.zeros_like(shards[0].read(f"reduce/{name}"), dtype=np.int64)
        last = np.zeros(total.shape, dtype=np.int8)
        for rf in shards:
            first = rf.read(f"reduce_state/first_{key}")
            total += rf.read(f"reduce/{name}") + ((last != 0) & (first != 0) & (last != first))
            shard_last = rf.read(f"reduce_state/last_{key}")
            last = np.where(shard_last != 0, shard_last, last)
        out[name] = total.astype(np.int32)
    return out


def _merged_arrays(shards: list) -> dict[str, np.ndarray]:
    """The merged per-row arrays the summary needs, read from the shards."""
    cat = lambda f: np.concatenate([f(rf) for rf in shards])  # noqa: E731
    return {
        "loss": np.concatenate([shards[0].train_loss[:1], cat(lambda rf: rf.train_loss[1:])]),
        "total": cat(lambda rf: rf.lca_total),
        "error": cat(lambda rf: rf.lca_error),
        "splits": cat(lambda rf: rf.lca_splits),
        "converged": cat(lambda rf: rf.lca_converged),
        "passes": cat(lambda rf: rf.read("recompute/passes")[: rf.n_rows]),
        "fh": cat(lambda rf: rf.read("reduce/frac_helping")[: rf.n_rows]),
        "fu": cat(lambda rf: rf.read("reduce/frac_hurting")[: rf.n_rows]),
        "fz": cat(lambda rf: rf.read("reduce/frac_zero")[: rf.n_rows]),
        **(
            {"total_se": cat(lambda rf: rf.read("lca/total_se")[: rf.n_rows])}
            if "lca/total_se" in shards[0].h5 and not shards[0].attrs.get("lca_subset_fixed", False)
            else {}
        ),
        **(
            {"cov_prev": cat(lambda rf: rf.read("estimate/cov_prev")[: rf.n_rows, -1])}
            if "estimate/cov_prev" in shards[0].h5
            else {}
        ),
    }


def _summary(a: dict[str, np.ndarray], df_draw: Any = None) -> dict[str, Any]:
    """The scalar ``summary/*`` attrs of a training run from the merged rows: the same definitions
    (:func:`lca_lab.loop.lca_summary`); ``df_draw``: a subset draw's degrees of freedom (the interval's)."""
    n = len(a["total"])
    out = {"lca_rows": n, **lca_summary(RunningSums.from_rows(a), n)}
    if "total_se" in a:  # fresh subset draws: independent rows (a fixed subset's rows are not: no entry)
        out |= {"lca_estimate": "subset", "lca_total": float(a["total"].sum())}
        var = np.sum(a["total_se"] ** 2) + 2.0 * np.sum(a.get("cov_prev", 0.0))
        out["lca_total_se"] = float(np.sqrt(max(var, 0.0)))
        if df_draw is not None:
            out["lca_interval_q"] = interval_q(run_df(int(df_draw), n, fixed=False))
    return out


def _copy_from_source(writer: RunWriter, source: Path) -> None:
    """Training-run data the merged file should carry: eval rows and the training split's indices."""
    if not source.exists():
        return
    with open_run(source) as src:
        idx = src.train_index
        names = [n for n in src.eval_names if n != "iteration"]
        evals = {n: src.eval(n) for n in names}
        its = src.eval("iteration") if "iteration" in src.eval_names else np.zeros(0, np.int64)
    if idx is not None:
        writer.write_array("data/train_index", idx)
    for j, it in enumerate(its):
        writer.append_eval(int(it), **{n: float(v[j]) for n, v in evals.items()})


def _merge_if_complete(run: Path, out: Path, num_shards: int) -> Path | None:
    """Merge when every shard is complete and the merged file is not already built from these shards.

    Each shard renames its file to the final name *before* calling this, and the check-and-merge runs
    under an exclusive lock: of two shards finishing together, one merges and the other then finds the
    merged file up to date (or, if it checked first, the later one sees all shards and merges).
    """
    with open(out / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done, missing = _shard_status(out, num_shards)
            if missing:
                return None
            ids = []
            for p in done:
                with h5py.File(p, "r", locking=False) as f:
                    ids.append(str(f.attrs["recompute/id"]))
            merged = out / MERGED_NAME
            if merged.exists():
                with h5py.File(merged, "r", locking=False) as f:
                    if json.loads(f.attrs.get("recompute/shard_ids", "[]")) == ids:
                        return merged
            return merge_shards(run, num_shards, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def recompute(
    run_dir: str | os.PathLike,
    shard: int = 0,
    num_shards: int = 1,
    *,
    merge: bool = True,
    out_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Compute one shard and, if it was the last one missing, merge. Returns paths and timing.

    ``kwargs`` go to :func:`compute_shard` (``lca``, ``device``, ``per_param``, ``flush_every``,
    ``progress``, ``allow_targets``). ``merge=False`` leaves merging to ``merge_shards`` (or
    ``merge=true`` on the CLI).
    """
    t0 = time.perf_counter()
    path = compute_shard(run_dir, shard, num_shards, out_dir=out_dir, **kwargs)
    seconds = time.perf_counter() - t0
    out = path.parent
    rank0 = kwargs.get("ranks", SINGLE).rank == 0
    merged = _merge_if_complete(resolve_path(run_dir), out, num_shards) if merge and rank0 else None
    return {"shard_file": str(path), "merged": str(merged) if merged else None, "seconds": seconds}


# ----------------------------------------------------------------------------------------------------------
# command line


def _out_dir_resolver(run_dir: Any, out_dir: Any = None) -> str:
    """``${lca_recompute_dir:${run_dir},${out_dir}}``: where logs go (Hydra resolves it before main)."""
    if out_dir not in (None, "None", "null", ""):
        return str(out_dir)
    if run_dir in (None, "None", "null", ""):  # the error comes from main; keep Hydra's logs out of cwd
        return str(Path(tempfile.gettempdir()) / "lca_lab-recompute")
    return str(default_out_dir(str(run_dir)))


OmegaConf.register_new_resolver("lca_recompute_dir", _out_dir_resolver, replace=True)

_VALUE_FLAGS = {"-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir", "--experimental-rerun"}


def rewrite_argv(argv: list[str]) -> list[str]:
    """Turn a positional ``RUN_DIR`` (an existing path) into the override ``run_dir='RUN_DIR'``.

    Paths may contain ``=`` and ``,`` (Hydra's multirun directory names do), so an existing path is
    taken as positional even then, and its value is quoted so that Hydra neither splits nor sweeps it.
    """
    out, prev = [argv[0]], ""
    for a in argv[1:]:
        positional = (
            not a.startswith("-") and prev not in _VALUE_FLAGS and ("=" not in a or os.path.exists(a))
        )
        if positional and not any(x.startswith("run_dir=") for x in out):
            quoted = str(Path(a).absolute()).replace("\\", "\\\\").replace("'", "\\'")
            a = f"run_dir='{quoted}'"
        out.append(a)
        prev = a
    return out


def _task(cfg) -> dict[str, Any]:
    c = validate_recompute(cfg)  # the typed schema (lca_lab.schema): one line naming the key
    if not c.get("run_dir"):
        raise RecomputeError(
            "give the training run: python -m lca_lab.recompute RUN_DIR (or run_dir=RUN_DIR)"
        )
    if c["merge"]:
        merged = merge_shards(c["run_dir"], c["num_shards"], c["out_dir"])
        return {"merged": str(merged)}
    lca = {k: v for k, v in (c.get("lca") or {}).items() if v is not None}
    n = 1 if c["num_shards"] is None else c["num_shards"]
    device, ranks = c["device"], SINGLE
    if world_from_env()[1] > 1:  # torchrun: this shard's passes shared by the launch's ranks
        device = rank_device(str(device))
        ranks = init_dist(device)
    return recompute(
        c["run_dir"], c["shard"], n, out_dir=c["out_dir"], lca=lca, device=device,
        per_param=c["per_param"], flush_every=int(c["flush_every"]),
        allow_targets=list(c.get("allow_targets") or []), ranks=ranks, progress=ranks.rank == 0,
    )  # fmt: skip


def _main(cfg) -> dict[str, Any]:
    try:
        res = _task(cfg)
    except (RecomputeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if world_from_env()[0] != 0:
        return res  # rank 0 reports
    if "shard_file" in res:
        print(f"shard file        : {res['shard_file']}   ({res['seconds']:.1f} s)")
    if res.get("merged"):
        print(f"merged run file   : {res['merged']}")
        _track(cfg, res["merged"])
    elif "shard_file" in res:
        print("merged run file   : not yet (other shards still missing; the last one to finish merges)")
    return res


def _track(cfg, merged: str) -> None:
    """A recompute of a tracked training run becomes a W&B run with the training run's Artifact as its
    input (W&B's mode as for the training run's ``logger.mode=auto``: ``WANDB_MODE``, else credentials)."""
    from .tracking import log_recompute

    run_id = log_recompute(resolve_path(cfg.run_dir), merged)
    if run_id:
        print(f"W&B recompute run : {run_id}")


def main() -> None:
    import hydra

    sys.argv = rewrite_argv(sys.argv)
    # An absolute path: Hydra would resolve a relative one as a package (``conf`` is not one).
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    # Hydra's errors while composing the config (e.g. a key that does not exist): one line, exit code 2.
    run_cli(hydra.main(version_base="1.3", config_path=conf, config_name="recompute")(_main), RecomputeConfig)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: launchers (submitit) pickle the task
    # function by reference, and the job process must import lca_lab.recompute (registering its resolver).
    from lca_lab.recompute import main as _module_main

    _module_main()
