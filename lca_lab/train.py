"""One run: config → data / net / optimizer → training loop → LCA engine → run file → summary.

``run(cfg, run_dir)`` takes the resolved config as a plain dict (no Hydra objects), so it can be
called from tests and notebooks as well as from ``python -m lca_lab``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import math
import os
import shutil
import signal
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from .data import load_data_config
from .lca import FullBatchLoss, LayerSums, LCAEngine, PendingStep, auto_chunk_size, set_matmul_precision
from .nets import build_net, entry_layer_index, layer_groups, param_layer_index
from .optim import apply_freezes, build_optimizer, plan_layers
from .reducers import LCAReducer
from .speed import check_settings, pass_settings
from .store import RunWriter, estimate_bytes


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
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy in eval mode (BN running stats, no dropout)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for s in range(0, len(x), chunk):
        out = model(x[s : s + chunk])
        loss += F.cross_entropy(out, y[s : s + chunk], reduction="sum").double()
        correct += (out.argmax(1) == y[s : s + chunk]).sum()
    model.train(was)
    return float(loss) / len(x), float(correct) / len(x)


def _append_theta(writer: RunWriter, theta: torch.Tensor, t: int) -> None:
    """One row of the θ-only trajectory of a run with LCA off (read by ``lca_lab.recompute``):
    ``trajectory/theta`` [T+1, K] float32 and ``trajectory/iteration`` [T+1] int64 (θ after t steps).
    With LCA on, θ is stored with the LCA rows instead (``trajectory/theta`` aligned with ``train/loss``)."""
    writer.append_dataset("trajectory/theta", theta, np.float32)
    writer.append_dataset("trajectory/iteration", t, np.int64)  # after θ: its length commits the row


def run(
    cfg: dict[str, Any],
    run_dir: str | os.PathLike,
    extra_attrs: dict[str, str] | None = None,
    tracker: Any = None,
) -> dict[str, Any]:
    """Train one network with online LCA; write ``<run_dir>/lca.h5``; return the summary dict.

    ``extra_attrs`` go into the run file's attributes (the CLI stores the Hydra overrides there).
    ``tracker`` (optional, e.g. ``tracking.WandbTracker``, or a zero-argument factory of one, called
    once the start-up checks have passed; its ``attrs`` join the run file's) gets
    ``log_iteration(it, **values)`` with device tensors it must buffer (no host sync here) and
    ``log_eval(it, **values)``.

    The run directory is locked for the whole run (a second process is refused). If it holds a
    checkpoint of this config (or ``resume=true`` is set) the run continues from it; see
    :func:`lca_lab.checkpoint.plan_resume`. SIGTERM/SIGUSR1/SIGUSR2 make the run checkpoint at the next
    iteration boundary, set ``status`` to ``preempted: …`` and raise :class:`RunPreempted` — after
    handing the signal to the handler installed before (submitit's requeue), if there was one.
    """
    validate(cfg)
    device = resolve_device(cfg["device"])
    run_dir = Path(run_dir)
    check_writable(run_dir)
    ckcfg = cfg.get("checkpoint") or {}
    try:
        with RunDirLock(run_dir), PreemptionSignals(bool(ckcfg.get("enabled", True))) as signals:
            mode, ck = plan_resume(run_dir, cfg)
            return _run(cfg, run_dir, extra_attrs, device, mode, ck, signals, tracker)
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


def _run(
    cfg: dict[str, Any],
    run_dir: Path,
    extra_attrs: dict[str, str] | None,
    device: torch.device,
    mode: str,
    ck: dict[str, Any] | None,
    signals: PreemptionSignals,
    tracker: Any = None,
) -> dict[str, Any]:
    """The body of :func:`run` with the run directory locked; ``mode`` is new / restart / resume."""
    set_determinism(int(cfg["seed"]), bool(cfg["deterministic"]))
    set_matmul_precision(str(cfg["lca"].get("precision", "fp32")))  # training and LCA alike
    dcfg, ncfg, ocfg, lcfg, scfg = cfg["data"], cfg["net"], cfg["opt"], cfg["lca"], cfg["store"]
    check_settings(lcfg, device if lcfg.get("enabled", True) else None, bool(cfg["deterministic"]))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data_config(dcfg, device)
    for w in caught:
        tqdm.write(f"WARNING: {w.message}")

    torch.manual_seed(int(cfg["seed"]))  # init does not depend on how much RNG data loading used
    net_kwargs = {k: v for k, v in ncfg.items() if k not in ("name", "lr")}
    model = build_net(ncfg["name"], data.input_shape, data.n_classes, **net_kwargs).to(device)
    speed = pass_settings(model, device, lcfg, bool(cfg["deterministic"]))  # how L's passes run
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    chunk = lcfg.get("chunk_size", 5000)
    chunk = auto_chunk_size(model, len(data.train_x), device, data.train_x) if chunk == "auto" else int(chunk)
    groups = layer_groups(model)
    try:
        plans = plan_layers(groups, cfg.get("layers") or {})
    except ValueError as e:
        # One line: the valid layers as "index/negative index name".
        first = str(e).splitlines()[0].split(" Valid layers")[0]
        valid = ", ".join(f"{i}/{i - len(groups)} {name}" for i, (name, _) in enumerate(groups))
        raise ConfigError(f"{first} Valid layers: {valid}" if "\n" in str(e) else str(e)) from None
    optimizer = build_optimizer(
        model,
        groups,
        ocfg["name"],
        float(ocfg["lr"]),
        plans,
        momentum=float(ocfg.get("momentum") or 0.0),
        betas=tuple(ocfg.get("betas", (0.9, 0.999))),
    )
    named = dict(model.named_parameters())
    pnames = [n for n, p in named.items() if p.requires_grad]
    param_layer = param_layer_index(model)
    index = entry_layer_index(model).to(device)  # [K] layer of every entry of θ
    K = int(index.numel())

    n_train = len(data.train_x)
    if int(cfg["batch_size"]) > n_train:
        raise ConfigError(
            f"batch_size={cfg['batch_size']} is larger than the training set ({n_train} examples of "
            f"{data.source}); use batch_size ≤ {n_train}"
        )
    per_epoch = math.ceil(n_train / int(cfg["batch_size"]))
    total_iters = per_epoch * int(cfg["epochs"])
    lca_on = bool(lcfg.get("enabled", True))
    window = lcfg.get("window")
    lo, hi = (0, total_iters) if window is None else (int(window[0]), min(int(window[1]), total_iters))
    n_rows = max(hi - lo, 0) if lca_on else 0
    # LCA off + store.trajectory: keep θ_t for t = lo..hi anyway, for offline LCA (lca_lab.recompute).
    theta_only = bool(scfg["trajectory"]) and not lca_on

    size = estimate_bytes(K, n_rows, bool(scfg["per_param"]), bool(scfg["trajectory"]), len(groups))
    size += 4 * K * (max(hi - lo, 0) + 1) if theta_only else 0
    budget = float(scfg["max_gb"]) * 1e9
    if size > budget:
        raise ConfigError(
            f"the run file would be {size / 1e9:.2f} GB ({n_rows} LCA rows × {K:,} parameters), over "
            f"store.max_gb={scfg['max_gb']}. Shrink it with store.per_param=false (keeps per-layer LCA), "
            f"store.trajectory=false, a shorter lca.window=[start,stop], fewer epochs, or raise store.max_gb."
        )
    free = shutil.disk_usage(run_dir).free
    if size > free:
        raise ConfigError(
            f"the run file needs about {size / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free in "
            f"{run_dir}; free space or use store.per_param=false."
        )

    if callable(tracker) and not hasattr(tracker, "log_iteration"):
        # A tracker factory: its (W&B) run starts only now, after every start-up check has passed.
        tracker = tracker()
        extra_attrs = {**(extra_attrs or {}), **(getattr(tracker, "attrs", None) or {})}
    attrs = {
        "config": yaml.safe_dump(cfg, sort_keys=False),
        "lca_lab_version": __version__,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "data_source": data.source,
        "lca_chunk_size": chunk,  # resolved (lca.chunk_size=auto): part of L's definition for BN nets
        **speed.attrs(),  # lca_channels_last, lca_cuda_graph, lca_cudnn_benchmark, lca_compile: resolved
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra_attrs or {}),
    }
    engine = None
    per_class = bool(lcfg.get("per_class", False))
    test_lca = bool(lcfg.get("test", False)) and len(data.test_x) > 0
    if lca_on:
        # How L's passes run (layout, graphs, cuDNN autotuning): its value only to float rounding.
        fast = speed.engine_kwargs()
        fbl = FullBatchLoss(
            model, data.train_x, data.train_y, chunk, param_names=pnames,
            n_classes=data.n_classes if per_class else None, **fast,
        )  # fmt: skip
        test_fbl = (
            FullBatchLoss(model, data.test_x, data.test_y, chunk, param_names=pnames, **fast)
            if test_lca
            else None
        )
        engine = LCAEngine(
            fbl, lcfg["method"], float(lcfg["tolerance"]), int(lcfg["max_splits"]),
            bool(lcfg.get("adaptive", True)), per_class=per_class, test_loss=test_fbl,
            layer_sums=LayerSums(index, len(groups)),  # each step's per-layer LCA comes with its total
        )  # fmt: skip

    def flat() -> torch.Tensor:
        return torch.cat([named[n].detach().reshape(-1) for n in pnames])

    milestones = [int(e) * per_epoch for e in (ocfg.get("lr_decay_epochs") or [])]
    decay = float(ocfg.get("lr_decay_factor", 0.1))
    batch_gen = torch.Generator(device="cpu").manual_seed(int(cfg["seed"]))
    eval_every = int(cfg["eval_every"])
    chunk_eval = chunk

    # Running statistics kept on the device; read once at the end (no per-iteration sync for them).
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # summed over iterations
    reducer = LCAReducer(index, len(groups), engine.layer_sums if engine is not None else None)
    layer_sums = reducer.layer_sums  # [..., K] → [..., n_layers] float64
    layer_total = torch.zeros(len(groups), dtype=torch.float64, device=device)
    max_abs_err, not_converged, total_splits, passes = 0.0, 0, 0, 0
    loss_start = loss_end = cum_err = 0.0
    # Wall time of every LCA iteration of this process (training step t, launching its LCA, recording step
    # t-1's: reducers, storage, tracker). Reading step t-1's error makes each iteration wait for the GPU work
    # queued before it, so in the steady state these are the throughput, and the host clock is honest.
    lca_iter_s: list[float] = []

    path = run_dir / "lca.h5"
    writer = RunWriter(
        path,
        param_names=pnames,
        param_shapes=[tuple(named[n].shape) for n in pnames],
        param_layer=param_layer,
        layer_names=[g[0] for g in groups],
        attrs=attrs,
        per_param=bool(scfg["per_param"]),
        trajectory=bool(scfg["trajectory"]) and lca_on,
        flush_every=int(scfg["flush_every"]),
        expected_rows=n_rows,
        n_classes=data.n_classes if per_class and lca_on else None,
        background=device.type == "cuda",  # rows leave the GPU without stalling it (writer thread)
        file_process=device.type == "cuda",  # and HDF5 is written by a child process, outside our GIL
        overwrite=mode == "restart",
        resume=ck["rows"] if ck is not None else None,
    )
    if mode == "restart":
        tqdm.write(f"WARNING: {path} had no checkpoint: starting it again from iteration 0 (resume=true)")

    ckcfg = cfg.get("checkpoint") or {}
    ck_on = bool(ckcfg.get("enabled", True))
    ck_every = int(ckcfg.get("every") or 0)
    ck_seconds = float(ckcfg.get("seconds") or 0)
    kill_at = int(os.environ.get(TEST_KILL_ENV, "-1"))
    start_it, resumed_perm, theta_next = 0, None, None
    if ck is not None:
        # Everything the loop carries from one iteration to the next, as it was at the checkpoint.
        start_it = int(ck["iteration"])
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        reducer.load_state_dict(ck["reducer"])
        batch_gen.set_state(ck["batch_gen"])
        resumed_perm = ck["perm"]
        lp = ck["loop"]
        counts.copy_(lp["counts"])
        layer_total.copy_(lp["layer_total"])
        max_abs_err, not_converged = float(lp["max_abs_err"]), int(lp["not_converged"])
        total_splits, passes = int(lp["total_splits"]), int(lp["passes"])
        loss_start, loss_end, cum_err = float(lp["loss_start"]), float(lp["loss_end"]), float(lp["cum_err"])
        set_rng_state(ck["rng"], device)
        writer.set_attr("resumed", f"from iteration {start_it} at {attrs['created']}")  # the latest resume
        if engine is not None and lo < start_it < hi:
            # The engine's cached endpoint gradient is not in the checkpoint: recompute it at θ_t
            # (the same function of the same θ, so the same bits on CPU).
            theta_next = flat()
            engine.prime(theta_next)
        tqdm.write(f"resuming {path} from its checkpoint at iteration {start_it} of {total_iters}")
        del ck

    def checkpoint(it: int, perm: torch.Tensor) -> None:
        """Flush the run file and save the loop state at the boundary before iteration ``it``."""
        save_checkpoint(
            run_dir,
            {
                "config": attrs["config"],
                "iteration": it,
                "rows": writer.committed_rows(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "reducer": reducer.state_dict(),
                "batch_gen": batch_gen.get_state(),
                "perm": perm.cpu(),
                "rng": rng_state(device),
                "loop": {
                    "counts": counts.cpu(),
                    "layer_total": layer_total.cpu(),
                    "max_abs_err": max_abs_err,
                    "not_converged": not_converged,
                    "total_splits": total_splits,
                    "passes": passes,
                    "loss_start": loss_start,
                    "loss_end": loss_end,
                    "cum_err": cum_err,
                },
            },
        )

    summary: dict[str, Any] = {}
    layer_names = [g[0] for g in groups]
    # Pipelining: step t's LCA is launched (its passes queued on the GPU), then the host trains step t+1,
    # whose kernels queue behind those passes, and only then reads step t's result and records it. The
    # host's work (training step, reducers, rows, tracker) thus overlaps the GPU's passes instead of
    # alternating with them. The numbers are those of the plain order; on the CPU only the order of the
    # work changes. ``pending`` is the launched step not yet recorded; it is recorded ("drained") before
    # anything that needs every row so far: an evaluation, a checkpoint, the end of the LCA window, a kill
    # test, a signal, an error.
    pending: tuple | None = None  # (iteration t, PendingStep, θ_{t+1}, batch loss of step t)

    def record(t: int, handle: PendingStep, theta1: torch.Tensor, batch_loss: torch.Tensor) -> None:
        """Finish step t's LCA (the one host read) and send it to the sums, the run file and the tracker."""
        nonlocal loss_end, cum_err, max_abs_err, not_converged, total_splits, passes, layer_total, counts
        st = handle.result()
        # The progress bar, the divergence check and the running sums need L and the error on the host:
        # the engine read them for its refinement decision.
        loss_end, err = st.host_loss1, st.host_error
        lca_total = st.total  # stays on the device: the writer and tracker batch it
        if not math.isfinite(loss_end):
            raise FloatingPointError(f"training loss became {loss_end} at iteration {t}; lower opt.lr")
        per_layer = st.layer  # [n_layers], from the engine's product that gave the total
        layer_total += per_layer
        views = reducer.update(st.param, st.delta, st.grad0)
        fh, fu = views["frac_helping"], views["frac_hurting"]
        # helping, hurting, zero; then helping among non-zero entries (the paper's Table 1)
        counts += torch.stack([fh, fu, views["frac_zero"], fh / (fh + fu).clamp_min(1e-300)])
        for name, v in views.items():
            writer.append_dataset(f"reduce/{name}", v, copy=False)  # fresh views, never modified
        if st.class_param is not None:
            class_layer = layer_sums(st.class_param)  # [n_classes, n_layers]
            writer.append_dataset("class/loss", st.class_loss1)
        if st.test_param is not None:
            writer.append_dataset("test/loss", st.test_loss1)
            writer.append_dataset("lca_test/layer", layer_sums(st.test_param))
            writer.append_dataset("lca_test/total", st.test_param.sum())
            writer.append_dataset("lca_test/error", st.test_error)
        cum_err += err
        max_abs_err = max(max_abs_err, abs(err))
        not_converged += int(not st.converged)
        total_splits += st.splits
        passes += st.passes
        writer.append(
            t,
            loss_end,
            lca_total,
            err,
            st.splits,
            st.converged,
            per_layer,
            st.param if scfg["per_param"] else None,
            theta1 if scfg["trajectory"] else None,
            class_layer=class_layer if st.class_param is not None else None,
            copy=False,  # every tensor here is fresh this iteration and never modified (θ_{t+1} neither)
        )
        if tracker is not None:  # device tensors: the tracker copies them in batches
            tracker.log_iteration(
                t, loss=loss_end, lca_total=lca_total, lca_error=err, splits=st.splits,
                frac_helping=fh, frac_hurting=fu, frac_zero=views["frac_zero"],
                batch_loss=batch_loss, layer_lca=dict(zip(layer_names, per_layer)),
            )  # fmt: skip
        bar.set_postfix(L=f"{loss_end:.4f}", err=f"{err:+.1e}", splits=st.splits, refresh=False)

    def drain() -> None:
        nonlocal pending
        if pending is not None:
            done, pending = pending, None
            record(*done)

    with writer:
        if mode != "resume":
            writer.write_array("data/train_index", np.asarray(data.train_index, dtype=np.int64))
        model.train()
        it = start_it
        bar = tqdm(
            total=total_iters, initial=start_it, desc=f"{ncfg['name']}/{data.source}", unit="it",
            dynamic_ncols=True,
        )  # fmt: skip
        last_ck = time.monotonic()
        try:
            for _epoch in range(start_it // per_epoch, int(cfg["epochs"])):
                b0 = it - _epoch * per_epoch  # > 0 only when resuming in the middle of an epoch
                if b0 > 0:
                    perm = resumed_perm.to(device)
                else:
                    perm = torch.randperm(n_train, generator=batch_gen).to(device)
                for b in range(b0, per_epoch):
                    if it in milestones:
                        for g in optimizer.param_groups:
                            g["lr"] *= decay
                    apply_freezes(optimizer, it)
                    do_lca = engine is not None and lo <= it < hi
                    t_iter = time.perf_counter()
                    # θ_{t+1} of the last step is θ_t of this one: reusing the tensor lets the engine reuse
                    # its endpoint gradient without comparing values.
                    if not do_lca:
                        theta_next = None
                    theta0 = (theta_next if theta_next is not None else flat()) if do_lca else None
                    if do_lca and it == lo:
                        loss_start = float(engine.prime(theta0))
                        loss_end = loss_start
                        writer.write_initial(loss_start, theta0 if scfg["trajectory"] else None)
                        start_point = engine.cached_point
                        if per_class:
                            writer.append_dataset("class/loss", start_point["Lc"])
                        if test_lca:
                            writer.append_dataset("test/loss", start_point["Lt"])
                    if theta_only and it == lo:
                        _append_theta(writer, flat(), it)
                    idx = perm[b * int(cfg["batch_size"]) : (b + 1) * int(cfg["batch_size"])]
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                    batch_loss.backward()
                    optimizer.step()
                    if theta_only and lo <= it < hi:
                        _append_theta(writer, flat(), it + 1)
                    if do_lca:
                        theta1 = theta_next = flat()
                        launched = (it, engine.launch(theta0, theta1), theta1, batch_loss.detach())
                        drain()  # step t-1: its passes were queued before this step's, so they are done first
                        pending = launched
                        lca_iter_s.append(time.perf_counter() - t_iter)
                    it += 1
                    if it >= hi:
                        drain()
                    if it % eval_every == 0 and it != total_iters:
                        drain()  # the tracker's steps must increase
                        tl, ta = evaluate(model, data.test_x, data.test_y, chunk_eval)
                        writer.append_eval(it, test_loss=tl, test_acc=ta)
                        if tracker is not None:
                            tracker.log_eval(it, test_loss=tl, test_acc=ta)
                    bar.update(1)
                    if it == kill_at:
                        drain()
                        os.kill(os.getpid(), signal.SIGKILL)
                    if ck_on and it < total_iters:
                        due = (ck_every and it % ck_every == 0) or (
                            ck_seconds and time.monotonic() - last_ck >= ck_seconds
                        )
                        if due or signals.signum is not None:
                            drain()
                            checkpoint(it, perm)
                            last_ck = time.monotonic()
                        if signals.signum is not None:
                            bar.close()
                            name = signal.Signals(signals.signum).name
                            writer.close(f"preempted: {name} at iteration {it}; rerun to continue")
                            prev = signals.previous.get(signals.signum)
                            raise RunPreempted(signals.signum, it, run_dir, prev)
            drain()
        except BaseException:
            with contextlib.suppress(Exception):
                drain()  # the launched step's rows are kept: nothing already computed is lost
            raise
        bar.close()

        train_loss, train_acc = evaluate(model, data.train_x, data.train_y, chunk_eval)
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, chunk_eval)
        writer.append_eval(
            total_iters, test_loss=test_loss, test_acc=test_acc, train_loss=train_loss, train_acc=train_acc
        )
        if tracker is not None:
            tracker.log_eval(total_iters, test_loss=test_loss, test_acc=test_acc,
                             train_loss=train_loss, train_acc=train_acc)  # fmt: skip
        summary = {
            "run_file": str(path),
            "data_source": data.source,
            "device": attrs["device"],
            "iterations": total_iters,
            "lca_rows": n_rows,
            "final_train_loss_eval": train_loss,
            "final_train_acc": train_acc,
            "final_test_loss": test_loss,
            "final_test_acc": test_acc,
        }
        if n_rows:
            for name, arr in reducer.result().items():
                writer.write_array(f"reduce/{name}", arr.cpu().numpy())
            c = (counts / n_rows).tolist()
            dl = loss_end - loss_start
            summary.update(
                {
                    "L_start": loss_start,
                    "L_end": loss_end,
                    "frac_helping": c[0],
                    "frac_hurting": c[1],
                    "frac_zero": c[2],
                    "pct_helping_nonzero": 100 * c[3],
                    "layer_lca": dict(zip([g[0] for g in groups], layer_total.tolist())),
                    "max_abs_error": max_abs_err,
                    "cumulative_error": cum_err,
                    "cumulative_rel_error": abs(cum_err) / abs(dl) if dl != 0 else float("inf"),
                    "not_converged": not_converged,
                    "mean_splits": total_splits / n_rows,
                    "grad_passes_per_iter": passes / n_rows,
                }
            )
        if lca_iter_s:
            summary["lca_s_per_iter"] = statistics.median(lca_iter_s)
            summary["lca_iters_timed"] = len(lca_iter_s)
        if engine is not None and engine.loss.graph_error:  # asked for, but the eager path ran
            summary["cuda_graph_error"] = engine.loss.graph_error
        if engine is not None and engine.loss.compile_error:  # likewise for torch.compile
            summary["compile_error"] = engine.loss.compile_error
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                writer.set_attr(f"summary/{k}", v)
    if ck_on:
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)  # complete: nothing left to resume
    return summary


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
            f"helping, zeros ignored (paper's Table 1): {s['pct_helping_nonzero']:.2f}%",
            "LCA per layer (nats, negative = helped):",
        ]
        width = max(len(n) for n in s["layer_lca"])
        lines += [f"  {n:<{width}} {v:+.5f}" for n, v in s["layer_lca"].items()]
        lines += [
            f"max |Σ LCA − ΔL| per iteration : {s['max_abs_error']:.2e} nats"
            f"   (rows over lca.tolerance: {s['not_converged']})",
            f"cumulative error              : {s['cumulative_error']:+.2e} nats = "
            f"{100 * s['cumulative_rel_error']:.3f}% of |L_T − L_0|",
            f"mean splits {s['mean_splits']:.2f}, "
            f"gradient passes per iteration {s['grad_passes_per_iter']:.2f}",
        ]
    if s.get("lca_s_per_iter"):
        lines.append(
            f"time per LCA iteration         : median {1e3 * s['lca_s_per_iter']:.2f} ms over "
            f"{s['lca_iters_timed']} in this process (training step, LCA, reducers, storage)"
        )
    lines.append(f"run file          : {s['run_file']}")
    return "\n".join(lines)
