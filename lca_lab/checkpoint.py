"""Surviving long runs: checkpoints, resume decisions, the run-directory lock and preemption signals.

A checkpoint (``<run dir>/checkpoint.pt``) holds everything the training loop needs to continue
bit-identically: model and optimizer state, the CPU/CUDA/numpy RNG states, the batch generator and the
current epoch's permutation, the LCA reducer and the loop's running sums, and the committed row count
of every dataset of the run file (so rows written after the checkpoint are truncated on resume). It is
written to a temporary file and renamed over the old one, so a kill at any instant leaves either the old
or the new checkpoint. It holds only tensors and plain containers and is loaded with
``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml

from .config import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"
FORMAT_VERSION = 1
# Exit status of a run stopped by SIGTERM/SIGUSR1/SIGUSR2 after writing its checkpoint: EX_TEMPFAIL,
# "temporary failure, try again" — rerunning the same command in the same directory continues it.
PREEMPTED_EXIT_CODE = 75
# Config keys that may differ between a run and its continuation: they do not change its numbers.
RESUME_IGNORED = (
    "resume", "checkpoint", "figures", "logger", "store.flush_every", "store.max_gb", "allow_targets",
)  # fmt: skip
# Config keys added after checkpoints existed, with the value that a checkpoint written before them ran
# with: such a run continues under the new code with that value (and is refused with any other).
IMPLIED_IN_OLDER = {
    "lca.cuda_graph": False, "lca.cudnn_benchmark": False, "lca.compile": False,
    # subset estimates (lca_lab.estimate) came later: a checkpoint without these keys ran exactly
    "lca.estimate": "exact", "lca.subset": 0.1, "lca.subset_fixed": False, "lca.subset_seed": None,
}  # fmt: skip
# The speed switches whose default became auto (lca_lab.speed): auto against a set value is no difference.
SPEED_AUTO = ("lca.channels_last", "lca.cuda_graph", "lca.cudnn_benchmark", "lca.compile")
# store.per_param became auto too: a resumed run keeps what its run file holds (train._check_size), so
# auto against a set value is no difference either (a contradicting set value is refused there).
STORE_AUTO = ("store.per_param",)
# Signals that ask a run to checkpoint and stop (SLURM sends SIGTERM, or --signal=USR1/USR2 before a
# time limit; submitit uses SIGUSR2 by default).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class RunPreempted(Exception):
    """The run stopped at an iteration boundary after a preemption signal; its checkpoint is saved."""

    def __init__(self, signum: int, iteration: int, run_dir: Path, previous_handler: Any = None) -> None:
        self.signum, self.iteration, self.run_dir = signum, iteration, run_dir
        self.previous_handler = previous_handler
        super().__init__(
            f"{signal.Signals(signum).name} received: checkpoint saved at iteration {iteration} in "
            f"{run_dir / CHECKPOINT_NAME}; rerun the same command (hydra.run.dir={run_dir}) to continue"
        )


# ----------------------------------------------------------------------------------------------------------
# lock


class RunDirLock:
    """An exclusive ``flock`` on ``<run dir>/.lock`` held for the whole run, so a second process writing
    the same run directory is refused instead of interleaving rows. The lock file names its holder
    (pid, host, start time) for the refusal message; the kernel drops the lock when the holder exits,
    even on SIGKILL, so a stale lock file never blocks a later run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"the run directory {self.path.parent} is in use by {holder}; wait for it to finish, stop "
                "it, or use another hydra.run.dir (two processes must not write one run file)"
            ) from None
        since = _dt.datetime.now().isoformat("T", "seconds")
        info = f"pid {os.getpid()} on {socket.gethostname()} since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------
# signals


class PreemptionSignals:
    """While active, SIGTERM/SIGUSR1/SIGUSR2 only set :attr:`signum`; the training loop checks it at
    every iteration boundary, checkpoints and stops. The handlers that were installed before (e.g.
    submitit's requeue handler) are remembered so the caller can hand the signal on after the
    checkpoint. Outside the main thread (where Python cannot install handlers) this does nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __enter__(self) -> PreemptionSignals:
        if not self.enabled:
            return self
        for sig in PREEMPT_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------------------
# checkpoint files


def rng_state(device: torch.device) -> dict[str, Any]:
    """CPU, CUDA (when the run uses it) and numpy global RNG states, as tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }  # fmt: skip
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``<run_dir>/checkpoint.pt`` atomically (temporary file, fsync, rename)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_name(f".{CHECKPOINT_NAME}.tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format_version": FORMAT_VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs); a clear error if it is not one."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or hostile file
        raise ConfigError(
            f"{path} cannot be loaded as an lca_lab checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "move it away to start the run again"
        ) from None
    need = ("format_version", "config", "iteration", "rows", "model", "optimizer", "rng")
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        raise ConfigError(f"{path} is not an lca_lab checkpoint (keys missing); move it away to start again")
    if ck["format_version"] != FORMAT_VERSION:
        raise ConfigError(
            f"{path} has checkpoint format {ck['format_version']}, this lca_lab reads {FORMAT_VERSION}"
        )
    return ck


# ----------------------------------------------------------------------------------------------------------
# resume decision


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ (``key: old → new``), ignoring :data:`RESUME_IGNORED`; a key of
    :data:`IMPLIED_IN_OLDER` missing from either side has its implied value (also train.py's default)."""
    # Round-trip the current config through YAML so both sides have the same types (tuples, floats).
    a, b = _flatten(stored), _flatten(yaml.safe_load(yaml.safe_dump(dict(current), sort_keys=False)))
    a, b = {**IMPLIED_IN_OLDER, **a}, {**IMPLIED_IN_OLDER, **b}

    def ignored(k: str) -> bool:
        return any(k == p or k.startswith(p + ".") for p in RESUME_IGNORED)

    def auto_vs_set(k: str) -> bool:
        # A speed switch set on one side and auto on the other (a checkpoint from before the auto
        # default): not refused; auto decides the same on the same device (lca_lab.speed).
        return k in (*SPEED_AUTO, *STORE_AUTO) and "auto" in (a.get(k), b.get(k))

    return [
        f"{k}: {a.get(k)!r} → {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if not ignored(k) and a.get(k) != b.get(k) and not auto_vs_set(k)
    ]


def _file_status(path: Path) -> str:
    try:
        with h5py.File(path, "r", locking=False) as f:
            s = f.attrs.get("status", "unknown")
            return s.decode() if isinstance(s, bytes) else str(s)
    except OSError:
        return "unreadable"


def plan_resume(run_dir: Path, cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Decide how a run in ``run_dir`` starts: ``("new", None)``, ``("restart", None)`` (replace an
    interrupted file that has no checkpoint; only with ``resume=true``) or ``("resume", checkpoint)``.

    Refuses (ConfigError, one line naming the fix) a complete run, a checkpoint whose config differs in
    keys that change results, and an existing run file without a checkpoint unless ``resume=true``.
    """
    run_file, ck_path = Path(run_dir) / "lca.h5", Path(run_dir) / CHECKPOINT_NAME
    want = bool(cfg.get("resume", False))
    status = _file_status(run_file) if run_file.exists() else None
    if status == "complete":
        raise ConfigError(
            f"{run_file} already exists and is complete: a run directory holds one run. Use another "
            "hydra.run.dir, or move the old run away; it is not overwritten."
        )
    if ck_path.exists():
        if status is None:
            raise ConfigError(
                f"{ck_path} exists but {run_file} does not, so there is nothing to continue; move the "
                "checkpoint away to start a new run there"
            )
        ck = load_checkpoint(ck_path)
        from .parts import upgrade_config  # a checkpoint written before targets: net.name → net._target_ …

        diff = config_diff(upgrade_config(yaml.safe_load(ck["config"])), cfg)
        if diff:
            raise ConfigError(
                f"cannot continue the run in {run_dir}: its config differs from the checkpointed one in "
                f"{'; '.join(diff)}. Rerun with the original values or use another hydra.run.dir."
            )
        return "resume", ck
    if status is not None:
        if want:
            return "restart", None
        raise ConfigError(
            f"{run_file} already exists (status {status!r}) and there is no checkpoint to continue from: "
            "use another hydra.run.dir, move the old run away, or pass resume=true to start it again "
            "from iteration 0 (replacing the file)"
        )
    return "new", None
