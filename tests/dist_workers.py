"""Functions run by each rank of the multi-process tests (spawned with torch.multiprocessing, gloo).

Each rank builds the same small problems, evaluates them with its shard of L's passes and saves what
it got; the test compares every rank's numbers with one process's.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist
from torch import nn

from lca_lab.dist import Shard
from lca_lab.examples import StreamedExamples, fingerprint_stream
from lca_lab.lca import FullBatchLoss, LCAEngine
from tests.own_parts import ItemDataset, lm_tensors


def fc_problem(seed: int = 0):
    """A tanh MLP on 23 examples (uneven shares), float64, 4 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(23, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    return model, x, y


def bn_problem(seed: int = 0):
    """A BatchNorm net on 10 examples in chunks of 6: two chunks, so a third rank has none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()
    return model, x, y


def evaluate_all(shard: Shard) -> dict:
    """L, ∇L, per-class parts and one RK4 step of each problem, with this shard of the passes."""
    out = {}
    for name, (make, chunk) in {"fc": (fc_problem, 4), "bn": (bn_problem, 6)}.items():
        model, x, y = make()
        n_classes = int(y.max()) + 1
        fbl = FullBatchLoss(model, x, y, chunk_size=chunk, n_classes=n_classes, shard=shard)
        th0 = fbl.flat_params()
        th1 = th0 + 0.05 * torch.randn(th0.shape, generator=torch.Generator().manual_seed(1), dtype=th0.dtype)
        L, g = fbl.loss_and_grad(th0)
        cl, cg = fbl.class_loss_and_grad(th0)
        step = LCAEngine(fbl, "rk4", tolerance=1e-10, max_splits=16, per_class=True).step(th0, th1)
        batch_L, batch_g = fbl.loss_and_grad_batch(torch.stack([th0, th1]))
        out[name] = {"L": L, "g": g, "loss": fbl.loss(th1), "class_L": cl, "class_g": cg, "param": step.param,
                     "splits": step.splits, "batch_L": batch_L, "batch_g": batch_g}  # fmt: skip
    x, y = lm_tensors(n=17)
    ds = ItemDataset(x, y)
    fp, n_targets, _ = fingerprint_stream(ds)
    from tests.own_parts import TinyLM

    torch.manual_seed(0)
    lm = TinyLM().double()
    streamed = StreamedExamples(ds, "cpu", fp["n_counted"], n_targets, (x.shape[1],))
    fbl = FullBatchLoss(lm, streamed, None, chunk_size=4, shard=shard)
    out["lm_streamed"] = dict(zip(("L", "g"), fbl.loss_and_grad(fbl.flat_params())))
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(evaluate_all(Shard(rank, world)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()
