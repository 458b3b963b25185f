"""``python -m lca_lab [overrides]``: the Hydra entry point; all work happens in ``train.run``."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .data import DatasetUnavailableError
from .train import format_summary, run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(plain, run_dir)
    except (ConfigError, DatasetUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # diverged: the run file keeps every earlier row, status "failed: …"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
