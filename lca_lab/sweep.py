"""Multirun plumbing for ``python -m lca_lab -m ...``: W&B run naming, one GPU per job, failure report.

A job that fails in a multirun does not stop the others: the entry point writes ``job_failed.txt``
(the error) into the job's directory and returns. :class:`FailureReport`, a Hydra callback registered
in ``conf/config.yaml``, runs in the launching process once every job has ended (basic, joblib and
submitit launchers alike), lists the failed jobs — marker files, and run files whose ``status`` is not
``complete`` — and exits with status 1 if there are any.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

FAILED_MARKER = "job_failed.txt"


def wandb_group(output_dir: str | os.PathLike, experiment: str | None, multirun: bool) -> str | None:
    """The W&B group: ``<experiment or 'sweep'>_<date>_<time>`` of the multirun directory for a
    multirun job (all jobs of one sweep together), the experiment name for a single run, else None."""
    if multirun:
        sweep_dir = Path(output_dir).resolve().parent  # multirun/<date>/<time>/<job> → multirun/<date>/<time>
        return f"{experiment or 'sweep'}_{sweep_dir.parent.name}_{sweep_dir.name}"
    return experiment or None


def run_name(override_dirname: str, job_num: int | None, experiment: str | None) -> str:
    """A readable W&B run name from the command-line overrides, e.g. ``3:layers=freeze_last,seed=1``."""
    name = override_dirname or experiment or "default"
    return f"{job_num}:{name}" if job_num is not None else name


def job_device(device: str, job_num: int, n_gpus: int) -> str:
    """One GPU per job when a multirun shares a machine with several GPUs: ``device=auto`` becomes
    ``cuda:<job number mod GPUs>`` (jobs started in parallel by the joblib launcher then use different
    GPUs). An explicit device, one GPU, or none leaves ``device`` as it is."""
    if device != "auto" or n_gpus <= 1:
        return device
    return f"cuda:{job_num % n_gpus}"


def job_order(path: str | os.PathLike) -> list[Any]:
    """Sort key that puts job directories in job order (``2_…`` before ``10_…``): digit runs compare as
    numbers, the rest as text."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(path)) if t]


def failed_jobs(sweep_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(job directory, reason) for every failed job under ``sweep_dir``: a ``job_failed.txt`` marker, or
    a run file whose status is not ``complete`` (a job killed before it could write a marker)."""
    sweep_dir = Path(sweep_dir)
    out: dict[str, str] = {}
    for m in sorted(sweep_dir.rglob(FAILED_MARKER)):
        out[str(m.parent)] = m.read_text().strip().splitlines()[0] if m.read_text().strip() else "failed"
    for f in sorted(sweep_dir.rglob("lca.h5")):
        if str(f.parent) in out:
            continue
        status = _run_status(f)
        if status != "complete":
            out[str(f.parent)] = status
    return sorted(out.items(), key=lambda kv: job_order(kv[0]))


def completed_jobs(sweep_dir: str | os.PathLike) -> int:
    """How many run files under ``sweep_dir`` have ``status = complete``."""
    return sum(_run_status(f) == "complete" for f in Path(sweep_dir).rglob("lca.h5"))


def _run_status(path: Path) -> str:
    """A run file's ``status`` attribute (``unknown`` if it has none, ``unreadable: …`` if it cannot be
    opened)."""
    import h5py

    try:
        with h5py.File(path, "r") as h:
            status = h.attrs.get("status", "unknown")
    except OSError as e:
        return f"unreadable: {e}"
    return status.decode() if isinstance(status, bytes) else str(status)


class FailureReport(Callback):
    """Hydra callback: after a multirun, list the failed jobs and exit 1 if there are any."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.exists():
            return
        bad = failed_jobs(sweep_dir)
        if not bad:
            return
        print(f"\n{len(bad)} job(s) of the multirun in {sweep_dir} failed:", file=sys.stderr)
        for d, why in bad:
            print(f"  {d}: {why}", file=sys.stderr)
        done = completed_jobs(sweep_dir)
        if done:
            print(
                f"{done} other job(s) completed; python -m lca_lab.analyze on the sweep analyses them and "
                "lists the failed ones too.",
                file=sys.stderr,
            )
        else:
            print(
                "No job completed: nothing to analyse. Fix the first error above and run again.",
                file=sys.stderr,
            )
        sys.stderr.flush()
        sys.exit(1)
