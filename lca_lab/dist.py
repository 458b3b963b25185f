"""One run over several processes: L's full-data passes sharded with ``torch.distributed``.

Every LCA iteration evaluates L and ∇L over the whole training split at several points of the step. The
passes are data parallel: each rank evaluates a fixed, disjoint share of the split, and one all-reduce
(sum, float64) per point of ``[∇ sum | loss sum]`` gives every rank the same L and ∇L. Shares:

* BatchNorm nets: whole ``chunk_size`` chunks (the chunks define L), the chunks dealt out in contiguous
  runs (rank r gets chunks ``⌊r·C/W⌋ … ⌊(r+1)·C/W⌋ − 1``);
* other nets: contiguous example ranges ``⌊r·N/W⌋ … ⌊(r+1)·N/W⌋ − 1``, each cut into chunks locally.

No padding and no duplicated example (a ``DistributedSampler`` pads: never for L). A rank may have no
chunk (more ranks than chunks): it contributes zeros to the all-reduce. Training stays single-stream
SGD: every rank takes the same step, and θ is broadcast from rank 0 after it, so θ is bit-identical on
every rank whatever the device's kernels do. A single process has no process group and none of this.

This module imports torch only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

DEFAULT_TIMEOUT_S = 300.0  # a rank that dies or hangs ends the run after at most this long


@dataclass(frozen=True)
class Shard:
    """This process's share of L's passes: ``rank`` of ``world`` (``world == 1``: the whole split)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        """More than one rank: passes are sharded and summed by all-reduce."""
        return self.world > 1

    def ranges(self, n: int, chunk_size: int, whole_chunks: bool) -> list[tuple[int, int]]:
        """This rank's chunks ``[(start, stop), …]`` of a split of ``n`` examples, in order."""
        return shard_chunks(n, chunk_size, self.world, self.rank, whole_chunks)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (the same result on every rank); a no-op for one rank."""
        if self.active:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t


SINGLE = Shard()


def shard_chunks(n: int, chunk_size: int, world: int, rank: int, whole_chunks: bool) -> list[tuple[int, int]]:
    """The chunks ``[(start, stop), …]`` rank ``rank`` of ``world`` evaluates in a split of ``n`` examples.

    ``whole_chunks`` (BatchNorm nets): the split's own chunks of ``chunk_size``, dealt out in contiguous
    runs, so every chunk is the one a single process would evaluate. Otherwise a contiguous example range
    per rank, cut into chunks of ``chunk_size``. Every example belongs to exactly one rank.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    if whole_chunks:
        starts = list(range(0, n, chunk_size))
        lo, hi = rank * len(starts) // world, (rank + 1) * len(starts) // world
        return [(s, min(s + chunk_size, n)) for s in starts[lo:hi]]
    lo, hi = rank * n // world, (rank + 1) * n // world
    return [(s, min(s + chunk_size, hi)) for s in range(lo, hi, chunk_size)]


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's (or SLURM's) environment; ``(0, 1, 0)`` without."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA ranks with a GPU each, gloo for CPU ranks (and for several ranks sharing one GPU, which
    NCCL refuses)."""
    if torch.device(device).type != "cuda":
        return "gloo"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
    return "nccl" if per_node <= torch.cuda.device_count() else "gloo"


def init(device: torch.device | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Shard:
    """Join the process group of this launch (env://), or return the single-process shard.

    ``timeout_s`` bounds every collective: a rank that died or hangs makes the others fail after at most
    this long instead of waiting forever.
    """
    rank, world, _ = world_from_env()
    if world <= 1:
        return SINGLE
    if not tdist.is_initialized():
        _slurm_rendezvous_env()
        tdist.init_process_group(
            backend_for(device), rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return Shard(tdist.get_rank(), tdist.get_world_size())


def _slurm_rendezvous_env() -> None:
    """Under SLURM without torchrun: the address of the job's first node and a port derived from the job
    id, so every task finds the same rendezvous."""
    env = os.environ
    if "MASTER_ADDR" in env or "SLURM_JOB_NODELIST" not in env:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        return
    import subprocess

    first = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    env["MASTER_ADDR"] = first[0] if first else "127.0.0.1"
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a run directory, a decision); itself in one process."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_params_(params, src: int = 0) -> None:
    """Rank ``src``'s values of ``params`` on every rank (θ after a training step): one flat broadcast."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return
    params = [p for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    tdist.broadcast(flat, src=src)
    with torch.no_grad():
        for p, v in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))


def close() -> None:
    """Leave the process group, if any."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def rank_device(setting: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` where the setting asks for CUDA (auto with a GPU)."""
    _, _, local = world_from_env()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return f"cuda:{local % max(1, torch.cuda.device_count())}"
    return setting


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank died, hung (the timeout) or broke."""
    dist_error = getattr(tdist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text
        for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo", "NCCL")
    )


class NoWriter:
    """A run file's writer on ranks other than 0: every write a no-op (rank 0 writes the one file)."""

    path = None
    committed_rows = 0

    def __enter__(self) -> NoWriter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
