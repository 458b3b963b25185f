"""``python -m lca_lab [overrides]``: the Hydra entry point; all work happens in ``train.run``.

Single run exit codes: 0 done, 2 config/data error (before any compute), 1 diverged, disk full or
other error, 75 preempted (checkpoint saved; rerun to resume), 130 Ctrl-C. In a multirun a failed job
writes ``job_failed.txt`` into its directory and returns so the other jobs go on;
``sweep.FailureReport`` makes the whole multirun exit 1 at the end. Ctrl-C stops all.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .checkpoint import PREEMPTED_EXIT_CODE, RunPreempted
from .cli_checks import check_group_choices, upsert_new_target_keys
from .config import ConfigError, run_cli, validate
from .data import DatasetUnavailableError
from .dist import SINGLE, broadcast_object, is_collective_failure, rank_device, world_from_env
from .dist import close as close_dist
from .dist import init as init_dist
from .schema import RunConfig
from .sweep import FAILED_MARKER, job_device, run_name, wandb_group
from .train import StorageError, format_summary, run


def _tracker(plain: dict[str, Any], hc: Any, multirun: bool, out: Path, overrides: list[str], **kw: Any):
    """The W&B tracker for ``logger=wandb`` (None for ``logger=none``); ``kw``: ``resume_id``."""
    lcfg = plain.get("logger") or {}
    if lcfg.get("name", "none") == "none":
        return None
    if lcfg["name"] != "wandb":
        raise ConfigError(f"logger={lcfg['name']!r} is unknown; use logger=wandb or logger=none")
    from .tracking import WandbTracker

    experiment = hc.runtime.choices.get("experiment")
    return WandbTracker(
        lcfg,
        {**plain, "overrides": overrides},
        out,
        group=wandb_group(out, experiment, multirun),
        name=run_name(hc.job.override_dirname, hc.job.num if multirun else None, experiment),
        job_type="train",
        **kw,
    )


def rank_run_dir(args: list[str]) -> list[str]:
    """Ranks other than 0 of a torchrun launch keep Hydra's own files out of the run directories: theirs
    go to a temporary directory, and the run uses rank 0's directory (broadcast once the group exists)."""
    rank, world, _ = world_from_env()
    if world == 1 or rank == 0 or any(a in ("-m", "--multirun") for a in args):
        return args
    quiet = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if any(a.startswith("hydra.run.dir=") for a in args):
        return [*args, *quiet]
    import tempfile

    return [*args, f"hydra.run.dir={tempfile.mkdtemp(prefix=f'lca_lab_rank{rank}_')}", *quiet]


def _drop_inherited_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Drop the group file's keys that a ``_target_`` replaced on the command line does not take (said in
    one line each): ``data._target_=mypkg.make_data`` with the default data file's root, split_seed …"""
    from omegaconf import open_dict

    from .parts import inherited_keys

    for section, keys in inherited_keys(cfg, overrides).items():
        with open_dict(cfg):
            for k in keys:
                del cfg[section][k]
        print(
            f"note: {section}: {', '.join(keys)} not passed to {cfg[section]['_target_']} "
            "(it takes no such argument)"
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)  # e.g. ["layers=freeze_last", "seed=1"]: readable labels
    plain: dict[str, Any] = {}
    tracker = None  # set once run() has created it, for every exit path below
    shard, own_dir = SINGLE, out

    def make_tracker(**kw: Any):
        nonlocal tracker
        tracker = _tracker(plain, hc, multirun, out, overrides, **kw)
        return tracker

    code, message = 0, ""
    try:
        _drop_inherited_keys(cfg, overrides)
        # The typed schema and the rules between keys, before anything else: one line, exit code 2.
        plain = validate(cfg)
        if multirun and world_from_env()[1] == 1:
            import torch

            plain["device"] = job_device(str(plain["device"]), int(hc.job.num), torch.cuda.device_count())
        if plain.get("dist", "auto") is not False and world_from_env()[1] > 1:
            # one run over the ranks of this launch: each its device, rank 0's run directory for all
            plain["device"] = rank_device(str(plain["device"]))
            shard = init_dist(plain["device"], float(plain.get("dist_timeout", 300)))
            out = Path(broadcast_object(str(out)))
        # The W&B run is created by run() only after every start-up check has passed (no W&B run for
        # a config that cannot run).
        summary = run(
            plain, out, extra_attrs={"overrides": json.dumps(overrides)},
            tracker=make_tracker if shard.rank == 0 else None, shard=shard,
        )  # fmt: skip
        if shard.rank != 0:
            return summary  # rank 0 reports
        print(format_summary(summary))
        if plain.get("figures", True) and summary.get("lca_rows"):
            # The run's own report and pictures next to its run file (the same code as the analyze command).
            # Imported here: matplotlib and scipy cost seconds of start-up that figures=false runs skip.
            from .analyze import analyze

            rep = analyze(out, repeats=200)
            n = len(rep["figures"])
            print(f"figures           : {n} figures (PNG, GIF) and report.md in {out}")
        if tracker is not None:
            tracker.log_summary(summary, summary["run_file"])
            tracker.log_figures(out)
        return summary
    except (ConfigError, DatasetUnavailableError) as e:
        code, message = 2, f"error: {e}"
    except KeyboardInterrupt:  # the writer has already flushed every completed row and set the status
        code = 130
        if tracker is not None:
            tracker.finish(code)
            tracker = None
        print(
            f"interrupted: every completed iteration is kept in {out / 'lca.h5'} "
            "(status 'failed: KeyboardInterrupt')",
            file=sys.stderr,
        )
        sys.exit(130)  # in a multirun too: Ctrl-C stops every job
    except RunPreempted as e:  # checkpoint saved, status "preempted: …"; the requeued job resumes
        code = PREEMPTED_EXIT_CODE
        if tracker is not None:
            tracker.finish(code)
            tracker = None
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(code)
    except (FloatingPointError, StorageError) as e:  # the run file keeps every earlier row, "failed: …"
        code, message = 1, f"error: {e}"
    except Exception as e:
        code = 1
        if shard.active and is_collective_failure(e):  # another rank died, hung or failed
            message = (
                f"error: rank {shard.rank}: another rank of this run failed or stopped answering "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); every committed "
                "row is kept in lca.h5 (status 'failed: …'); the same command resumes from its checkpoint"
            )
        elif not multirun:
            raise  # a bug: Hydra prints the traceback
        else:
            message = f"error: {type(e).__name__}: {e}"
            traceback.print_exc()
    finally:
        if tracker is not None:
            tracker.finish(code)
        if shard.active:
            close_dist()
            if shard.rank != 0 and own_dir.name.startswith("lca_lab_rank"):
                shutil.rmtree(own_dir, ignore_errors=True)  # the temporary home of this rank's Hydra
    print(message, file=sys.stderr)
    if not multirun:
        sys.exit(code)
    # Multirun: record the failure and let the other jobs run; FailureReport exits 1 at the end.
    (out / FAILED_MARKER).write_text(f"{message}\nexit code {code}\n")
    return {"status": f"failed: {message}", "exit_code": code}


if __name__ == "__main__":
    # Hydra's own error for a missing config option is several lines with a stack-trace hint; check the
    # group choices on the command line first and say it in one line.
    problem = check_group_choices(sys.argv[1:], Path(__file__).resolve().parents[1] / "conf")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = rank_run_dir(upsert_new_target_keys(sys.argv[1:]))
    # Hydra's errors while composing the config (e.g. an override of a key that does not exist): one line.
    run_cli(main, RunConfig)
