"""``python -m lca_lab [overrides]``: the Hydra entry point; all work happens in ``train.run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .analyze import analyze
from .checkpoint import PREEMPTED_EXIT_CODE, RunPreempted
from .config import ConfigError, check_group_choices
from .data import DatasetUnavailableError
from .train import StorageError, format_summary, run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    hc = HydraConfig.get()
    overrides = json.dumps(list(hc.overrides.task))  # e.g. ["layers=freeze_last", "seed=1"]: readable labels
    try:
        summary = run(plain, hc.runtime.output_dir, extra_attrs={"overrides": overrides})
    except (ConfigError, DatasetUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the writer has already flushed every completed row and set the status
        print(
            f"interrupted: every completed iteration is kept in {Path(hc.runtime.output_dir) / 'lca.h5'} "
            "(status 'failed: KeyboardInterrupt')",
            file=sys.stderr,
        )
        sys.exit(130)
    except (FloatingPointError, StorageError) as e:  # the run file keeps every earlier row, "failed: …"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except RunPreempted as e:  # checkpoint saved, status "preempted: …"
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    print(format_summary(summary))
    if plain.get("figures", True) and summary.get("lca_rows"):
        # The run's own report and pictures next to its run file (the same code as the analyze command).
        rep = analyze(Path(hc.runtime.output_dir), repeats=200)
        n = len(rep["figures"])
        print(f"figures           : {n} figures (PNG, GIF) and report.md in {hc.runtime.output_dir}")
    return summary


if __name__ == "__main__":
    # Hydra's own error for a missing config option is several lines with a stack-trace hint; check the
    # group choices on the command line first and say it in one line.
    problem = check_group_choices(sys.argv[1:], Path(__file__).resolve().parents[1] / "conf")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
