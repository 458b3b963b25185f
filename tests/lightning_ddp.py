"""A Lightning DDP fit on 2 CPU processes with ``LCACallback`` (run by tests/test_lightning.py):
``python tests/lightning_ddp.py RUN_DIR``; Lightning's DDP launcher starts rank 1 by running it again."""

from __future__ import annotations

import sys

import torch

from lca_lab.integrations.lightning import LCACallback
from tests.loops import N, lightning_module, lightning_trainer, loader, problem

if __name__ == "__main__":
    torch.set_num_threads(1)
    _, model, x, y = problem()
    cb = LCACallback(train_data=(x, y), run_dir=sys.argv[1], lca={"tolerance": 1e-5, "chunk_size": 16},
                     store={"trajectory": True}, figures=False)  # fmt: skip
    trainer = lightning_trainer([cb], strategy="ddp", devices=2, max_epochs=3)
    trainer.fit(lightning_module(model), loader(x, y, N // 4))
