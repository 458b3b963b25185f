"""An HF Trainer run on 2 CPU processes with ``LCATrainerCallback`` (run by tests/test_hf_trainer.py):
``torchrun --nproc_per_node 2 tests/hf_ddp.py RUN_DIR OUT_DIR``."""

from __future__ import annotations

import sys

import torch
from transformers import Trainer

from lca_lab.integrations.hf import LCATrainerCallback
from tests.test_hf_trainer import _args, _lm

if __name__ == "__main__":
    torch.set_num_threads(1)
    model, _, items = _lm()
    cb = LCATrainerCallback(run_dir=sys.argv[1], lca={"tolerance": 1e-5}, store={"trajectory": True},
                            figures=False)  # fmt: skip
    args = _args(sys.argv[2], ddp_backend="gloo")
    Trainer(model=model, args=args, train_dataset=items, callbacks=[cb]).train()
