"""``python -m lca_lab.bench --ranks N``: L's full-data pass on N ranks against one, in the same run.

Each rank is one process with one thread (gloo on the CPU; on GPUs one rank per device with NCCL where
``--device cuda`` and N ≤ the GPU count, else gloo). Measured, medians over ``--iters`` passes:

* ``pass_s_1``: one process evaluating ``loss_and_grad`` over the whole split;
* ``pass_s_N``: the same pass sharded over N ranks, its all-reduce included (the slowest rank's time);
* ``allreduce_s``: the all-reduce alone ([K + 1] float64: the gradient and the loss sum, one per point);
* ``efficiency = pass_s_1 / (N · pass_s_N)``;
* ``allreduce_share``: the share of each sharded pass spent in its own all-reduce (the wait for the slower
  ranks included), timed inside the same passes, so it lies in [0, 1] however noisy the machine;
* ``theta_broadcast_s``: θ sent from rank 0 to the others, once per training step.

``project_h200`` adds a projection for 8 GPUs from a measured single-GPU pass time and all-reduce size, with
the chunk granularity of BatchNorm nets (whole chunks per rank) made explicit.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

from .data import synthetic
from .dist import Shard
from .lca import FullBatchLoss, auto_chunk_size, has_batchnorm
from .nets import fc, lenet, resnet20

NETS = {"fc": (fc, "mnist"), "lenet": (lenet, "mnist"), "resnet20": (resnet20, "cifar10")}


def _problem(net: str, n_train: int, device: str):
    build, shape = NETS[net]
    data = synthetic(shape=shape, size=n_train, split_seed=0)
    torch.manual_seed(0)
    model = build(input_shape=data.input_shape, n_classes=data.n_classes).to(device)
    return model, data.train_x.to(device), data.train_y.to(device)


@dataclass(frozen=True)
class _TimedShard(Shard):
    """A shard that records how long each of its all-reduces takes (seconds, device synchronised)."""

    sync: Any = field(default=lambda: None, compare=False)
    times: list = field(default_factory=list, compare=False)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.sync()
        t0 = time.perf_counter()
        super().all_reduce_(t)
        self.sync()
        self.times.append(time.perf_counter() - t0)
        return t


def _time_passes(fbl: FullBatchLoss, iters: int, sync) -> tuple[float, float]:
    """Median seconds per ``loss_and_grad`` pass, and the median share of a pass spent in all-reduces."""
    theta = fbl.flat_params()
    fbl.loss_and_grad(theta)  # warm-up
    times, shares = [], []
    for _ in range(iters):
        reduced = getattr(fbl.shard, "times", [])
        reduced.clear()
        sync()
        t0 = time.perf_counter()
        fbl.loss_and_grad(theta)
        sync()
        times.append(time.perf_counter() - t0)
        shares.append(sum(reduced) / times[-1])
    return statistics.median(times), statistics.median(shares)


def _sync_for(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _rank_main(rank: int, world: int, port: int, opts: dict, out: str) -> None:
    """One rank: its share of the pass, and the all-reduce alone; the slowest rank's times are reported."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = f"cuda:{rank}" if opts["backend"] == "nccl" else opts["device"]
    tdist.init_process_group(
        opts["backend"], rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        model, x, y = _problem(opts["net"], opts["n_train"], device)
        sync = _sync_for(device)
        fbl = FullBatchLoss(model, x, y, opts["chunk"], shard=_TimedShard(rank, world, sync=sync))
        t_pass, share = _time_passes(fbl, opts["iters"], sync)
        buf = torch.zeros(fbl.n_params + 1, dtype=torch.float64, device=device)
        theta = fbl.flat_params()  # θ as the training step broadcasts it, in the model's dtype
        ar, bc = [], []
        for _ in range(max(5, opts["iters"])):
            for op, times in (
                (lambda: tdist.all_reduce(buf), ar),
                (lambda: tdist.broadcast(theta, src=0), bc),
            ):
                tdist.barrier()
                t0 = time.perf_counter()
                op()
                sync()
                times.append(time.perf_counter() - t0)
        medians = [t_pass, statistics.median(ar), statistics.median(bc), share]
        slowest = torch.tensor(medians, dtype=torch.float64, device=device)
        tdist.all_reduce(slowest, op=tdist.ReduceOp.MAX)
        if rank == 0:
            keys = ("pass_s", "allreduce_s", "broadcast_s", "allreduce_share")
            torch.save({**dict(zip(keys, slowest.tolist())), "K": fbl.n_params}, out)
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaling(net: str, ranks: int, n_train: int, iters: int, device: str = "cpu") -> dict[str, Any]:
    """The pass on 1 and on ``ranks`` ranks, measured in this run: see the module docstring."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    model, x, y = _problem(net, n_train, device)
    chunk = auto_chunk_size(model, len(y), device, x)
    one = FullBatchLoss(model, x, y, chunk)
    pass_1, _ = _time_passes(one, iters, _sync_for(device))
    backend = "nccl" if device.startswith("cuda") and ranks <= torch.cuda.device_count() else "gloo"
    opts = {
        "net": net,
        "n_train": n_train,
        "iters": iters,
        "chunk": chunk,
        "device": device,
        "backend": backend,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_rank_main, args=(ranks, _free_port(), opts, out), nprocs=ranks, join=True)
        got = torch.load(out)
    n_chunks = math.ceil(len(y) / chunk)
    return {
        "net": net, "n_train": n_train, "device": device, "backend": backend, "ranks": ranks, "K": got["K"],
        "chunk_size": chunk, "n_chunks": n_chunks, "whole_chunks": has_batchnorm(model),
        "threads_per_rank": 1, "pass_s_1": pass_1, "pass_s_N": got["pass_s"],
        "efficiency": pass_1 / (ranks * got["pass_s"]), "allreduce_s": got["allreduce_s"],
        "allreduce_share": got["allreduce_share"], "allreduce_bytes": 8 * (got["K"] + 1),
        "theta_broadcast_s": got["broadcast_s"],  # once per training step: θ from rank 0 to all
    }  # fmt: skip


def project(
    pass_s_1: float,
    k: int,
    ranks: int,
    n_chunks: int | None,
    bus_gb_s: float = 150.0,
    latency_s: float = 5e-5,
) -> dict[str, Any]:
    """Projected efficiency on ``ranks`` GPUs from a one-GPU pass time and K: a ring all-reduce moves
    2(N−1)/N · 8(K+1) bytes at ``bus_gb_s`` plus ``latency_s``; BatchNorm nets deal out whole chunks, so
    the slowest rank evaluates ⌈C/N⌉ of the C chunks (``n_chunks``; None: examples split evenly)."""
    nbytes = 8 * (k + 1)
    ar = 2 * (ranks - 1) / ranks * nbytes / (bus_gb_s * 1e9) + latency_s
    share = pass_s_1 / ranks if n_chunks is None else pass_s_1 * math.ceil(n_chunks / ranks) / n_chunks
    t = share + ar
    return {
        "ranks": ranks, "allreduce_bytes": nbytes, "allreduce_s": ar, "pass_s_N": t,
        "efficiency": pass_s_1 / (ranks * t), "assumed_bus_gb_s": bus_gb_s, "assumed_latency_s": latency_s,
        "n_chunks": n_chunks,
    }  # fmt: skip


def format_scaling(r: dict[str, Any]) -> str:
    return (
        f"{r['net']} on {r['n_train']} examples ({r['device']}, {r['backend']}, "
        f"{r['threads_per_rank']} thread per rank, K={r['K']:,}, "
        f"{r['n_chunks']} chunks of {r['chunk_size']}):\n"
        f"  one rank   : {r['pass_s_1']:.3f} s per pass\n"
        f"  {r['ranks']} ranks    : {r['pass_s_N']:.3f} s per pass, "
        f"{100 * r['allreduce_share']:.1f} % of it in the all-reduce, waits included "
        f"(alone: {1e3 * r['allreduce_s']:.2f} ms for "
        f"{r['allreduce_bytes'] / 1e6:.2f} MB); θ broadcast per step: {1e3 * r['theta_broadcast_s']:.2f} ms\n"
        f"  efficiency : {r['efficiency']:.3f}  (time(1) / (N · time(N)))"
    )
