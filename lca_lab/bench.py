"""Speed benchmark of online LCA: the engine against the physical limit and against a naive baseline.

    python -m lca_lab.bench [--nets fc,lenet,resnet20,allcnn] [--device auto|cpu|cuda]
                            [--precision fp32,tf32] [--methods rk4,first_order] [--iters 20] [--warmup 3]
                            [--n-train N] [--naive/--no-naive] [--run/--no-run] [--storage]
                            [--json PATH]

For every net × precision × method it measures, on synthetic data of the paper's shapes (MNIST-shaped
55,000 × 1×28×28 for fc and lenet, CIFAR-shaped 45,000 × 3×32×32 for resnet20 and allcnn, 10 classes):

* **limit**: the best time of one full-data forward+backward pass of the plain model (a loop over chunks,
  no LCA machinery), both in the engine's chunk size and as one chunk of the whole set (where memory
  allows), with ``--cuda-graph on|both`` also the pass replayed as one CUDA graph, and with
  ``--cudnn-benchmark both`` (CPU) also with cuDNN's autotuner on, with ``--compile`` also through
  ``torch.compile``; the fastest is the limit.
* **engine**: an online-LCA training loop pipelined as ``lca_lab/train.py`` runs it (SGD step t and
  ``LCAEngine.launch`` of its LCA, then step t−1's ``result()``, the one host read of the error per
  iteration); seconds per iteration (median after warm-up, optimizer step included), gradient passes
  per iteration, efficiency = mean passes × limit ÷ mean time per iteration,
  max |error|, cumulative relative error |Σ error| / |L_end − L_start|, peak GPU memory.
* **run** (``--run``, on by default): the same number of LCA iterations in the real training loop,
  ``lca_lab.train.run`` on ``data=synthetic`` of the same shape and size: the median wall time of an LCA
  iteration with what the engine loop leaves out (reducers, the run file's rows).
* **naive**: the same integrator written as one first would (DataLoader over CPU tensors, a deep copy of
  the model in train mode with dropout off and BN batch statistics, gradients copied to the host and
  accumulated in float64 numpy, Simpson 1-4-1 with the endpoint gradient reused), replayed on the
  engine's own trajectory θ_t: time per iteration, speed-up = naive ÷ engine, and the largest difference
  between its LCA totals and the engine's (a correctness check: same L, same points, same weights).
* **storage stall** (``--storage``): the engine loop without and with per-parameter rows written through
  :class:`lca_lab.store.RunWriter`, in ``--storage-repeats`` pairs of loops run alternately; the median
  over pairs of (mean time per iteration with storage ÷ without − 1), and the same from median times
  (what every iteration pays; the rest is the few iterations that flush). On a GPU the writer does its
  HDF5 calls in a child process, as ``train.py`` does; ``--writer thread|both`` measures the writer
  thread's own HDF5 calls instead or as well, in the same repeats (JSON ``storage_thread_*``).
* ``--cuda-graph on|both``: rows with each full-data pass replayed as one CUDA graph (``lca.cuda_graph``);
  ``--cudnn-benchmark on``: rows with cuDNN's autotuner on for the engine's passes
  (``lca.cudnn_benchmark``; the naive baseline keeps PyTorch's default, off, as first written, and runs in
  a fresh process, since PyTorch keeps the plans of the engine's autotuned passes for the whole process;
  ``both`` adds a row per setting on the CPU only, for the same reason);
  ``--compile on|both``: rows with the engine's passes through ``torch.compile`` (``lca.compile``), and a
  compiled pass in the limit;
  ``--profile DIR``: a ``torch.profiler`` table of 5 further engine iterations per row, for finding where
  an iteration's time goes (on CUDA by GPU time and by host time); with ``--storage`` also of the first
  stall pair's loops without and with the writer (``--flush-every`` further iterations each, one flush).
* **ops per iteration** (``--count-ops``): ops per LCA iteration of the training loop (top-level ``aten``
  ops other than views; on CUDA also kernel and graph launches), from two profiled runs
  (:func:`ops_per_iteration`): what a launch-bound loop's time on a GPU is made of, counted on any machine.
* **layer sums** (``--layer-sums``): per net, the per-layer sums every online iteration makes (the LCA
  by layer; the reducer's helping/hurting counts by layer) on the net's own layer index, by
  ``index_add_`` and by :class:`lca_lab.lca.LayerSums`, in µs per call (GPU kernel time on CUDA); and a
  step's total with its per-layer sums, as a ``sum`` then the sums (the engine before) against
  :meth:`LayerSums.with_total` (one product, what the engine takes now).

Precision ``fp32`` turns TF32 off for both cuBLAS matmuls and cuDNN convolutions (cuDNN's default is on);
``tf32`` turns both on. Conv nets run channels-last on CUDA (``--channels-last auto``). Global flags are
restored afterwards. Results print as a table on stdout and, with ``--json``, as JSON; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import datetime as _dt
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import nets
from .jsonable import jsonable
from .lca import (
    PRECISIONS,
    FullBatchLoss,
    LayerSums,
    LCAEngine,
    auto_chunk_size,
    cudnn_benchmark,
    has_batchnorm,
    matmul_precision,
    saved_activation_bytes,
)
from .loop import Launched, LCADriver, StepRecorder
from .nets import entry_layer_index, layer_groups, param_layer_index
from .reducers import LCAReducer
from .speed import PassSettings, pass_settings

# Per-net settings mirroring conf/net/*.yaml (kwargs of the factory lca_lab.nets.<net>), the SGD learning
# rate of conf/experiment/lr/table1*/<net>_sgd.yaml and train.py's batch sizes (tests/test_bench.py checks
# the kwargs and rates against the YAML files).
NET_SPECS: dict[str, dict[str, Any]] = {
    "fc": {"data": "mnist", "kwargs": {}, "lr": 0.1, "batch": 250},
    "lenet": {"data": "mnist", "kwargs": {"dropout": 0.5, "padding": 2}, "lr": 0.01, "batch": 128},
    "resnet20": {"data": "cifar10", "kwargs": {"width": 16}, "lr": 0.1, "batch": 128},
    "allcnn": {"data": "cifar10", "kwargs": {"width": 1.0}, "lr": 0.05, "batch": 128},
}
# The paper's training-set sizes and input shapes.
DATA_SHAPES: dict[str, tuple[int, tuple[int, int, int]]] = {
    "mnist": (55_000, (1, 28, 28)),
    "cifar10": (45_000, (3, 32, 32)),
}
N_CLASSES = 10
CONV_NETS = ("lenet", "resnet20", "allcnn")
# A bare `python -m lca_lab.bench` by device (flags given keep their meaning). GPU: the four nets at the
# paper's sizes in both precisions. CPU: fc and lenet on small synthetic sets, so that a bare run ends in
# minutes on 2 cores (a LeNet pass over 55,000 examples costs ~30 s there; README, "Measured on this
# 2-core CPU"), a short recompute, and refinement capped at 4 splits: LeNet's first steps on synthetic
# inputs move L by nats and would refine to 32 splits (19 passes per iteration at 256 examples) —
# iterations over the tolerance there are counted in max|err|, as in any run.
GPU_DEFAULTS: dict[str, Any] = {
    "nets": ["fc", "lenet", "resnet20", "allcnn"], "precisions": ["fp32", "tf32"], "n_train": None,
    "recompute_iters": 128, "max_splits": 32,
}  # fmt: skip
CPU_DEFAULTS: dict[str, Any] = {
    "nets": ["fc", "lenet"], "precisions": ["fp32"], "n_train": 256, "recompute_iters": 8, "max_splits": 4,
}  # fmt: skip
# Naive iterations when --naive-iters is not given: the naive path is several times slower than the
# engine, so the big nets get few (enough for a median of a steady per-iteration cost).
DEFAULT_NAIVE_ITERS = {"fc": 10, "lenet": 3, "resnet20": 3, "allcnn": 3}

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def log(msg: str) -> None:
    """Progress line on stderr (stdout carries only the result table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# options


@dataclass
class BenchOptions:
    """Everything a benchmark run depends on (the CLI fills it; tests build it directly).

    ``n_train`` None means the paper's size for each data shape; ``chunk_size`` is passed to
    ``FullBatchLoss`` as given (an int, or whatever the engine accepts for an automatic size) and the
    limit is measured at the chunk size the engine then reports.
    """

    nets: list[str] = field(default_factory=lambda: ["fc", "lenet"])
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    methods: list[str] = field(default_factory=lambda: ["rk4", "trapezoid"])
    iters: int = 20
    warmup: int = 3
    n_train: int | None = None
    naive: bool = True
    naive_iters: int | None = None
    storage: bool = False
    flush_every: int = 50
    chunk_size: Any = "auto"
    channels_last: str = "auto"
    tolerance: float = 1e-3
    max_splits: int = 32
    limit_repeats: int = 3
    whole_chunk: str = "auto"
    seed: int = 0
    recompute_iters: int = 128  # steps of a stored trajectory recomputed with batched points (0: skip)
    batch_points: int | None = None  # None: 64 on a GPU, 1 on the CPU (as lca_lab.recompute)
    # rows with lca.cuda_graph / lca.cudnn_benchmark / lca.compile off (False), on (True) or auto (None: as
    # lca_lab.speed decides for the net and precision, see row_settings)
    cuda_graphs: list[bool | None] = field(default_factory=lambda: [False])
    cudnn_benchmarks: list[bool | None] = field(default_factory=lambda: [False])
    compiles: list[bool | None] = field(default_factory=lambda: [False])
    storage_repeats: int = 3  # on/off loop pairs for the storage stall
    # --storage on a GPU: the run writer's HDF5 writes in a child process (as train.py) and/or its thread
    writers: list[str] = field(default_factory=lambda: ["process"])
    profile_dir: str | None = None  # write a torch.profiler table of a few engine iterations per row
    keep_param: bool = False  # keep per-iteration per-parameter LCA arrays in the result (tests)
    run: bool = True  # also time the real training loop (lca_lab.train.run) on synthetic data of the shape
    layer_sums: bool = False  # also time the per-layer sums (index_add_ against LayerSums) for each net
    count_ops: bool = False  # also count the ops (and CUDA launches) per LCA iteration of the training loop
    writer_pauses: bool = False  # also measure the pauses the run writer's flushes cause a busy Python thread
    # the naive baseline in a fresh process: auto (where rows use cuDNN's autotuner on CUDA) | on | off
    naive_process: str = "auto"


# --cuda-graph / --cudnn-benchmark / --compile: the setting of each row; None: auto, decided per net and
# precision by lca_lab.speed.pass_settings as python -m lca_lab decides it (on the CPU: off)
ROW_SETTINGS = {"off": [False], "on": [True], "both": [False, True], "auto": [None]}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    """Command line → :class:`BenchOptions`; invalid values exit with one line naming the fix."""
    p = argparse.ArgumentParser(
        prog="python -m lca_lab.bench",
        description="Time online LCA against one full-data pass (the limit) and a naive baseline.",
    )
    p.add_argument(
        "--nets", help="comma list of fc,lenet,resnet20,allcnn (default: fc,lenet on CPU, all on GPU)"
    )  # other device-dependent defaults: GPU_DEFAULTS, CPU_DEFAULTS
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", help="comma list of fp32,tf32 (default: fp32,tf32 on GPU, fp32 on CPU)")
    p.add_argument(
        "--methods", default="rk4,trapezoid", help="LCA methods, comma list (default rk4,trapezoid)"
    )
    p.add_argument("--iters", type=int, default=20, help="measured LCA iterations (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="iterations before measuring (default 3)")
    p.add_argument(
        "--n-train", type=int,
        help="examples (default: GPU 55,000 MNIST-shaped, 45,000 CIFAR-shaped; CPU 256)",
    )  # fmt: skip
    p.add_argument(
        "--naive", action=argparse.BooleanOptionalAction, default=True, help="run the naive baseline"
    )
    p.add_argument("--naive-iters", type=int, help="naive iterations (default: fc 10, others 3; ≤ --iters)")
    p.add_argument(
        "--naive-process", choices=["auto", "on", "off"], default="auto",
        help="run the naive baseline in a fresh process, where cuDNN has cached no algorithm (auto: when "
        "rows use cuDNN's autotuner on CUDA, whose choices the process would otherwise reuse)",
    )  # fmt: skip
    p.add_argument("--storage", action="store_true", help="also measure the run-file writer's stall")
    p.add_argument(
        "--flush-every", type=int, default=50, help="RunWriter rows per flush with --storage (as train.py)"
    )
    p.add_argument(
        "--chunk-size", default="auto", help="FullBatchLoss chunk size: int, or auto (lca.chunk_size=auto)"
    )
    p.add_argument(
        "--recompute-iters", type=int,
        help="steps of a stored trajectory recomputed with batched path points (nets without BN; 0: skip; "
        "default: GPU 128, CPU 8)",
    )  # fmt: skip
    p.add_argument(
        "--batch-points", type=int, help="points per vmap batch in the recompute (default: GPU 64, CPU 1)"
    )
    p.add_argument(
        "--cuda-graph", default="auto", choices=["auto", "off", "on", "both"],
        help="replay each full-data pass as a CUDA graph (lca.cuda_graph); both: a row for each; auto "
        "(default): as lca_lab.speed decides for the net and precision (CPU: off)",
    )  # fmt: skip
    p.add_argument(
        "--cudnn-benchmark", default="auto", nargs="?", const="on", choices=["auto", "off", "on", "both"],
        help="cuDNN times its algorithms once per shape for the engine's passes (lca.cudnn_benchmark; "
        "the naive baseline keeps PyTorch's default, off, in a fresh process); both: a row for each (CPU "
        "only: on CUDA the first setting's plans would stay for the second's rows); auto (default): as "
        "lca_lab.speed decides (CPU: off)",
    )  # fmt: skip
    p.add_argument(
        "--compile", default="auto", nargs="?", const="on", choices=["auto", "off", "on", "both"],
        help="torch.compile the engine's passes (lca.compile); the limit then also times a compiled pass; "
        "both: a row for each; auto (default): as lca_lab.speed decides (CPU: off)",
    )  # fmt: skip
    p.add_argument(
        "--writer-pauses", action="store_true",
        help="also measure the pauses the run writer's flushes cause a busy Python thread (per --writer)",
    )  # fmt: skip
    p.add_argument(
        "--writer", choices=["process", "thread", "both"], default="process",
        help="with --storage on a GPU: HDF5 writes in a child process (as train.py), in the writer thread, "
        "or both side by side (default process)",
    )  # fmt: skip
    p.add_argument(
        "--storage-repeats", type=int, default=3,
        help="with --storage: pairs of loops without/with the writer, run alternately",
    )  # fmt: skip
    p.add_argument(
        "--profile", dest="profile_dir",
        help="folder: write a torch.profiler table of 5 extra engine iterations per row",
    )  # fmt: skip
    p.add_argument(
        "--run", action=argparse.BooleanOptionalAction, default=True,
        help="also time python -m lca_lab's training loop per LCA iteration (reducers, run file included)",
    )  # fmt: skip
    p.add_argument(
        "--layer-sums", action="store_true",
        help="also time the per-layer sums and counts for each net's layer index (index_add_ vs LayerSums)",
    )  # fmt: skip
    p.add_argument(
        "--count-ops", action="store_true",
        help="also count ops (on CUDA: kernel and graph launches) per LCA iteration of python -m lca_lab",
    )  # fmt: skip
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="auto: as lca_lab.speed decides (conv nets on CUDA, but NCHW for a compiled, "
                   "autotuned fp32 BatchNorm net)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=1e-3, help="engine tolerance, nats (default 1e-3)")
    p.add_argument(
        "--max-splits", type=int, help="engine's largest number of Simpson splits (default: GPU 32, CPU 4)"
    )
    p.add_argument(
        "--limit-repeats", type=int, default=3, help="full passes timed per chunking (best counts)"
    )
    p.add_argument("--whole-chunk", default="auto", choices=["auto", "on", "off"],
                   help="also time the whole set as one chunk (auto: where memory allows)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", "--out", dest="json_path", help="also write the results as JSON to this path")
    a = p.parse_args(argv)

    def fail(msg: str) -> None:
        p.error(msg)

    try:
        device = resolve_device(a.device)
    except ValueError as e:
        fail(str(e))
    on_gpu = device.type == "cuda"
    dflt = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    nets = _csv(a.nets) if a.nets else list(dflt["nets"])
    precisions = _csv(a.precision) if a.precision else list(dflt["precisions"])
    n_train = dflt["n_train"] if a.n_train is None else a.n_train
    recompute_iters = dflt["recompute_iters"] if a.recompute_iters is None else a.recompute_iters
    max_splits = dflt["max_splits"] if a.max_splits is None else a.max_splits

    def rows(flag: str) -> list[bool | None]:  # auto on the CPU: off for every net (lca_lab.speed)
        return [False] if flag == "auto" and not on_gpu else ROW_SETTINGS[flag]

    methods = _csv(a.methods)
    chunk: Any = int(a.chunk_size) if a.chunk_size.lstrip("-").isdigit() else a.chunk_size
    opts = BenchOptions(
        nets=nets, device=str(device), precisions=precisions, methods=methods, iters=a.iters,
        warmup=a.warmup, n_train=n_train, naive=a.naive, naive_iters=a.naive_iters, storage=a.storage,
        flush_every=a.flush_every, chunk_size=chunk, channels_last=a.channels_last, tolerance=a.tolerance,
        max_splits=max_splits, limit_repeats=a.limit_repeats, whole_chunk=a.whole_chunk, seed=a.seed,
        recompute_iters=recompute_iters, batch_points=a.batch_points,
        cuda_graphs=rows(a.cuda_graph), cudnn_benchmarks=rows(a.cudnn_benchmark), compiles=rows(a.compile),
        storage_repeats=a.storage_repeats, profile_dir=a.profile_dir,
        writers=["process", "thread"] if a.writer == "both" else [a.writer],
        run=a.run, layer_sums=a.layer_sums, count_ops=a.count_ops, writer_pauses=a.writer_pauses,
        naive_process=a.naive_process,
    )  # fmt: skip
    try:
        check_options(opts)
    except ValueError as e:
        fail(str(e))
    opts.json_path = a.json_path  # type: ignore[attr-defined]
    return opts


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; asking for cuda without one is an error naming the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def check_options(o: BenchOptions) -> None:
    """Raise ``ValueError`` naming the fix for any invalid option, before any compute."""
    bad = [n for n in o.nets if n not in NET_SPECS]
    if bad or not o.nets:
        raise ValueError(f"--nets {','.join(bad) or '(empty)'}: choose from {','.join(NET_SPECS)}")
    bad = [p for p in o.precisions if p not in PRECISIONS]
    if bad or not o.precisions:
        raise ValueError(f"--precision {','.join(bad) or '(empty)'}: choose from {','.join(PRECISIONS)}")
    if "tf32" in o.precisions and not str(o.device).startswith("cuda"):
        raise ValueError("--precision tf32 only exists on CUDA; use --precision fp32 on CPU")
    if not o.methods:
        raise ValueError("--methods is empty; e.g. --methods rk4")
    if o.iters < 1 or o.warmup < 0:
        raise ValueError(f"--iters must be ≥ 1 and --warmup ≥ 0 (got {o.iters}, {o.warmup})")
    if o.naive_iters is not None and o.naive_iters < 1:
        raise ValueError(f"--naive-iters must be ≥ 1 (got {o.naive_iters}); use --no-naive to skip it")
    if o.n_train is not None and o.n_train < 1:
        raise ValueError(f"--n-train must be ≥ 1 (got {o.n_train})")
    if (isinstance(o.chunk_size, int) and o.chunk_size < 1) or (
        not isinstance(o.chunk_size, int) and o.chunk_size != "auto"
    ):
        raise ValueError(f"--chunk-size must be a positive integer or auto (got {o.chunk_size})")
    if o.recompute_iters < 0 or (o.batch_points is not None and o.batch_points < 1):
        raise ValueError("--recompute-iters must be ≥ 0 and --batch-points ≥ 1")
    if o.flush_every < 1 or o.limit_repeats < 1 or o.storage_repeats < 1:
        raise ValueError("--flush-every, --limit-repeats and --storage-repeats must be ≥ 1")
    if any(o.cuda_graphs) and not str(o.device).startswith("cuda"):
        raise ValueError("--cuda-graph on/both records CUDA graphs; use --cuda-graph off on the CPU")
    if any(o.compiles) and any(o.cuda_graphs):
        raise ValueError("--compile and --cuda-graph are separate rows' settings; give one of them as off")
    if len(set(o.cudnn_benchmarks)) > 1 and str(o.device).startswith("cuda"):
        # PyTorch caches one cuDNN plan per convolution shape per process, found by the first pass of the
        # shape whatever cudnn.benchmark says later: the second setting's rows would time the first's.
        raise ValueError(
            "--cudnn-benchmark both on CUDA: cuDNN keeps the algorithm the first pass of each shape chose "
            "for the rest of the process, so the second setting's rows would time the first's; run the "
            "bench once with --cudnn-benchmark off and once with --cudnn-benchmark on"
        )
    if o.naive_process not in ("auto", "on", "off"):
        raise ValueError(f"--naive-process {o.naive_process!r}: choose auto, on or off")
    if o.profile_dir is not None and not os.path.isdir(o.profile_dir):
        raise ValueError(f"--profile {o.profile_dir}: not an existing folder")


# ------------------------------------------------------------------------------------------------------
# data, precision, timing


def make_data(shape: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic ``x [n, C, H, W]`` float32 (standard normal) and ``y [n]`` int64 on the CPU.

    Labels come from a fixed random linear teacher (argmax of ``x·W``), so the nets can learn and the
    loss falls along the measured trajectory, as in a real run; the values say nothing about learning.
    """
    n_full, chw = DATA_SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *chw, generator=g)
    w = torch.randn(math.prod(chw), N_CLASSES, generator=g)
    y = (x.reshape(n, -1) @ w).argmax(1)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lca_mode_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in the mode that defines L: BN on batch statistics without touching running
    statistics (train mode, ``track_running_stats=False``), dropout off. The original is untouched."""
    m = copy.deepcopy(model)
    m.train()
    for mod in m.modules():
        if isinstance(mod, _BN_TYPES):
            mod.track_running_stats = False
        elif isinstance(mod, _DROPOUT_TYPES):
            mod.eval()
    return m


def full_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
    """One plain forward+backward over all of ``x`` in chunks of ``chunk``; gradients accumulate in .grad."""
    for s in range(0, len(x), chunk):
        F.cross_entropy(model(x[s : s + chunk]), y[s : s + chunk], reduction="sum").backward()


def time_full_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, repeats: int) -> float:
    """Best wall time (s) of :func:`full_pass` over ``repeats`` runs after one untimed warm-up."""
    device = x.device
    times = []
    for r in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t = time.perf_counter()
        full_pass(model, x, y, chunk)
        _sync(device)
        if r:  # the first run pays for cuDNN autotuning and allocator growth
            times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return min(times)


def _mem_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def time_fast_pass(fbl: FullBatchLoss, repeats: int, what: str) -> float | None:
    """Best wall time (s) of one ``loss_and_grad`` of ``fbl`` built with ``cuda_graph=True`` (``what`` =
    ``"graph"``) or ``compile=True`` (``"compiled"``), over ``repeats`` passes after the first one, which
    records the graph or compiles and is not timed; None if that failed (the eager path then ran)."""
    theta = fbl.flat_params()
    t = time.perf_counter()
    fbl.loss_and_grad(theta)
    log(f"  {what} pass: recorded/compiled in {time.perf_counter() - t:.0f} s")
    error = fbl.graph_error if what == "graph" else fbl.compile_error
    if error is not None:
        log(f"  the {what} pass failed ({error}); no {what} limit")
        return None
    times = []
    for _ in range(repeats):
        _sync(theta.device)
        t = time.perf_counter()
        fbl.loss_and_grad(theta)
        _sync(theta.device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure_limit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int,
    repeats: int,
    whole: str,
    graph: bool = False,
    channels_last: bool = False,
    benchmarks: Sequence[bool] = (False,),
    compiled: bool = False,
) -> dict[str, Any]:
    """Best full-pass time (s) in chunks of ``chunk`` and, where memory allows, as one chunk.

    ``whole``: ``on`` always tries one chunk, ``off`` never; ``auto`` tries it on CUDA (an out-of-memory
    error just skips it) and on the CPU only when the saved activations fit in half the free memory
    (a CPU out-of-memory kills the process instead of raising).
    ``graph`` (CUDA): also the pass in chunks of ``chunk`` replayed as one CUDA graph, which removes the
    launch cost that bounds small nets' eager passes: then the limit is what the hardware can do, and
    rows without graphs are held to it too.
    ``benchmarks``: the cuDNN autotuner settings of the rows (``cudnn.benchmark`` off/on); the pass in
    chunks is timed with the first, and with both where there are two (``limit_chunk_bm_s``); the
    whole-set and graph passes with the last (on, where any row uses it).
    ``compiled``: also the pass in chunks of ``chunk`` through ``torch.compile`` (``limit_compiled_s``,
    after one untimed compiling pass), the limit of rows with ``lca.compile``.
    Returns ``limit_s`` (the best), ``limit_chunk_s``, ``limit_chunk_bm_s``, ``limit_whole_s``,
    ``limit_graph_s``, ``limit_compiled_s`` (None when not measured).
    """
    m = lca_mode_copy(model)
    bm = bool(benchmarks[-1])
    with cudnn_benchmark(benchmarks[0]):
        t_chunk = time_full_pass(m, x, y, chunk, repeats)
    out: dict[str, Any] = {
        "limit_chunk_s": t_chunk,
        "limit_chunk_bm_s": None,
        "limit_whole_s": None,
        "limit_graph_s": None,
        "limit_compiled_s": None,
    }
    if len(benchmarks) > 1:
        with cudnn_benchmark(True):
            out["limit_chunk_bm_s"] = time_full_pass(m, x, y, chunk, repeats)
    n = len(x)
    try_whole = whole == "on" or (whole == "auto" and chunk < n)
    if try_whole and whole == "auto" and x.device.type == "cpu":
        need = saved_activation_bytes(m, x[:16])[0] * n * 3  # saved tensors + grads + temporaries
        try_whole = need < 0.5 * _mem_available_bytes()
    if try_whole:
        try:
            with cudnn_benchmark(bm):
                out["limit_whole_s"] = time_full_pass(m, x, y, n, repeats)
        except torch.cuda.OutOfMemoryError:
            log(f"  one chunk of {n} does not fit in GPU memory; limit from chunks of {chunk}")
        m.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
    if graph:
        fbl = FullBatchLoss(m, x, y, chunk, channels_last=channels_last, cuda_graph=True, cudnn_benchmark=bm)
        out["limit_graph_s"] = time_fast_pass(fbl, repeats, "graph")
        del fbl  # frees the graph's memory pool
        torch.cuda.empty_cache()
    if compiled:
        fbl = FullBatchLoss(m, x, y, chunk, channels_last=channels_last, cudnn_benchmark=bm, compile=True)
        out["limit_compiled_s"] = time_fast_pass(fbl, repeats, "compiled")
        del fbl
    out["limit_s"] = min(t for k, t in out.items() if k.startswith("limit_") and t is not None)
    return out


# ------------------------------------------------------------------------------------------------------
# the engine loop


def _build(
    net: str, input_shape: tuple[int, int, int], seed: int, device: torch.device, cl: bool
) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(nets, net)(input_shape=input_shape, n_classes=N_CLASSES, **NET_SPECS[net]["kwargs"]).to(
        device
    )
    if cl:
        model = model.to(memory_format=torch.channels_last)
    return model


def engine_loop(
    net: str,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    o: BenchOptions,
    channels_last: bool,
    writer_dir: str | None = None,
    cuda_graph: bool = False,
    file_process: bool = True,
    profile_path: str | None = None,
    cudnn_bm: bool = False,
    compiled: bool = False,
    profile_iters: int = 5,
) -> dict[str, Any]:
    """The online LCA loop of ``python -m lca_lab`` (:class:`lca_lab.loop.LCADriver` and
    :class:`~lca_lab.loop.StepRecorder`: SGD step t, the launch of its LCA, the record of step t−1 with the
    reducers): ``warmup + iters`` iterations, the last ``iters`` timed.

    Returns per-iteration wall times ``times`` [iters] (s, optimizer step included), ``passes``,
    ``splits``, ``error``, ``total``, ``loss0``, ``loss1`` [iters] (host lists, float64 where numeric),
    ``thetas`` (the ``iters + 1`` flat parameter vectors θ_t of the measured segment, on the device),
    ``chunk_size`` (as the engine reports it), ``model`` and, with ``o.keep_param``, ``param``
    [iters, K] float64 numpy. With ``writer_dir``, rows (per-parameter included) go to a run file there
    (on a GPU by the writer thread and, with ``file_process``, its child process, as in ``train.py``);
    ``writer_host_s`` [iters]: the training thread's time in the writer's path per measured row.
    """
    device, spec = x.device, NET_SPECS[net]
    model, fbl, engine, index = _online_engine(
        net, x, y, method, o, channels_last, cuda_graph, cudnn_bm, compiled
    )
    pnames = [n for n, p in model.named_parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    n_extra = profile_iters if profile_path else 0  # profiled after the measured iterations, not timed
    n_total = o.warmup + o.iters
    gen = torch.Generator().manual_seed(o.seed + 1)
    batches = torch.randint(0, len(x), (n_total + n_extra, spec["batch"]), generator=gen).to(device)
    writer = None
    if writer_dir is not None:
        writer = _TimedWriter(
            _bench_writer(writer_dir, model, o.flush_every, n_total + n_extra, file_process),
            range(o.warmup, n_total),
        )
    recorder = StepRecorder(
        LCAReducer(index, engine.layer_sums.n_layers, engine.layer_sums), writer,
        divergence_hint=f"{net}: the benchmark needs a finite run",
    )  # fmt: skip

    def flat() -> torch.Tensor:
        return torch.cat([named[n].detach().reshape(-1) for n in pnames])

    def step(i: int) -> torch.Tensor:
        """Training step i (SGD on a fixed random batch) → its mini-batch loss."""
        idx = batches[i]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        return loss

    model.train()
    driver = LCADriver(engine, recorder, flat, (0, n_total + n_extra))
    clock = _LoopClock(o.warmup, device, driver.start())  # θ_0 primed and recorded before the clock
    driver.train(range(n_total), step, [clock], after=clock.after)
    clock.stop()
    if profile_path:
        _profile_loop(driver, step, range(n_total, n_total + n_extra), profile_path, device, (
            f"{n_extra} engine iterations ({net}, {method}, cuda_graph={cuda_graph}, "
            f"cudnn_benchmark={cudnn_bm}) on {device}"
            + (f", with the run-file writer (a flush every {o.flush_every} rows)" if writer else "")
        ))  # fmt: skip
    if writer is not None:
        writer.close()
    return _loop_result(clock, model, fbl, writer, o.keep_param)


def _loop_result(
    clock: _LoopClock, model: nn.Module, fbl: FullBatchLoss, writer: Any, keep_param: bool
) -> dict:
    """:func:`engine_loop`'s result from its measured steps (recorded already: no compute here)."""
    steps = [launched.handle.result() for launched in clock.measured]
    res: dict[str, Any] = {
        "times": clock.times,
        "passes": [int(s.passes) for s in steps],
        "splits": [int(s.splits) for s in steps],
        "thetas": clock.thetas,
        "chunk_size": int(fbl.chunk_size),
        "model": model,
        "compile_error": fbl.compile_error,
        "param_names": [n for n, p in model.named_parameters() if p.requires_grad],
        "writer_host_s": writer.host_s if writer is not None else [],
    }
    # One host transfer for all measured scalars, after timing.
    scal = torch.stack([torch.stack([s.error, s.total, s.loss0, s.loss1]) for s in steps]).double().cpu()
    res["error"], res["total"], res["loss0"], res["loss1"] = (scal[:, j].tolist() for j in range(4))
    if keep_param:
        res["param"] = torch.stack([s.param for s in steps]).double().cpu().numpy()
    return res


def _online_engine(
    net: str,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    o: BenchOptions,
    channels_last: bool,
    cuda_graph: bool,
    cudnn_bm: bool,
    compiled: bool,
) -> tuple[nn.Module, FullBatchLoss, LCAEngine, torch.Tensor]:
    """The net (seeded), L's passes, the engine of an engine row (each step's per-layer LCA from the
    engine, in the product that gives its total, as ``train.py``) and the [K] layer index of θ's entries."""
    device = x.device
    model = _build(net, tuple(x.shape[1:]), o.seed, device, channels_last)
    pnames = [n for n, p in model.named_parameters() if p.requires_grad]
    chunk = auto_chunk_size(model, len(x), device, x) if o.chunk_size == "auto" else int(o.chunk_size)
    fbl = FullBatchLoss(
        model, x, y, chunk, param_names=pnames, channels_last=channels_last, cuda_graph=cuda_graph,
        cudnn_benchmark=cudnn_bm, compile=compiled,
    )  # fmt: skip
    index = entry_layer_index(model).to(device)
    sums = LayerSums(index, len(layer_groups(model)))
    engine = LCAEngine(fbl, method, tolerance=o.tolerance, max_splits=o.max_splits, layer_sums=sums)
    return model, fbl, engine, index


class _LoopClock:
    """Wall time of each measured iteration of :func:`engine_loop` (s), without a sync of its own: in the
    steady state, the loop's throughput. A :class:`~lca_lab.loop.Boundary` at the warm-up's end: there
    the clock starts once the warm-up's work is finished (recorded and synchronised: on a big net, its
    queued passes would otherwise fall into the first measured iterations); :meth:`stop` adds the time
    until the last measured step's LCA is recorded, so the times add up to exactly the measured work.

    ``measured``: the launched steps of the measured iterations; ``thetas``: their θ_t, θ_{t+1}, … [K].
    """

    def __init__(self, warmup: int, device: torch.device, theta0: torch.Tensor):
        self.warmup, self.device, self.theta = warmup, device, theta0
        self.times: list[float] = []
        self.thetas: list[torch.Tensor] = []
        self.measured: list[Launched] = []
        _sync(device)
        self.t = time.perf_counter()

    def after(self, it: int, launched: Launched | None) -> None:
        """After iteration ``it − 1``: its time, if measured."""
        now = time.perf_counter()
        if it - 1 >= self.warmup:
            if not self.thetas:
                self.thetas.append(self.theta)
            self.times.append(now - self.t)
            self.thetas.append(launched.theta1)
            self.measured.append(launched)
        self.t, self.theta = now, launched.theta1

    def due(self, it: int) -> bool:
        return it == self.warmup

    def __call__(self, it: int) -> None:
        _sync(self.device)
        self.t = time.perf_counter()

    def stop(self) -> None:
        _sync(self.device)
        self.times[-1] += time.perf_counter() - self.t


class _TimedWriter:
    """A :class:`~lca_lab.store.RunWriter` whose row calls are timed: ``host_s``, the training thread's
    time (s) in the writer's path for each row of ``rows`` (its per-row series and its LCA row, with the
    flushes they trigger)."""

    def __init__(self, writer: Any, rows: range):
        self.writer, self.rows, self.host_s, self._pending_s = writer, rows, [], 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)

    def append_dataset(self, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        self.writer.append_dataset(*args, **kwargs)
        self._pending_s += time.perf_counter() - t

    def append(self, row: int, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        self.writer.append(row, *args, **kwargs)
        spent, self._pending_s = self._pending_s + time.perf_counter() - t, 0.0
        if row in self.rows:
            self.host_s.append(spent)


def _bench_writer(writer_dir: str, model: nn.Module, flush_every: int, rows: int, file_process: bool) -> Any:
    """The run-file writer of a benchmark loop, set up as ``train.py`` sets up a run's."""
    from .store import RunWriter  # h5py only when storage is measured

    named = dict(model.named_parameters())
    pnames = [n for n, p in named.items() if p.requires_grad]
    device = next(model.parameters()).device
    return RunWriter(
        os.path.join(writer_dir, "lca.h5"),
        param_names=pnames,
        param_shapes=[tuple(named[n].shape) for n in pnames],
        param_layer=param_layer_index(model),
        layer_names=[g[0] for g in layer_groups(model)],
        attrs={"config": "bench", "device": str(device)},
        per_param=True,
        flush_every=flush_every,
        expected_rows=rows,
        background=device.type == "cuda",  # as train.py: rows leave the GPU without a blocking copy
        file_process=file_process,  # as train.py: HDF5 calls outside this process's GIL
    )


def _profile_loop(
    driver: LCADriver, step: Callable, iterations: range, path: str, device: torch.device, title: str
) -> None:
    """Profile further iterations of the loop (not timed) into a table at ``path``."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        driver.train(iterations, step)
        _sync(device)
    with open(path, "w") as f:
        f.write(title + "\n")
        table = prof.key_averages()
        if device.type == "cuda":
            f.write("by GPU time:\n" + table.table(sort_by="self_cuda_time_total", row_limit=40) + "\n")
        # Host time: what bounds small nets' loops, and where a writer's per-row work shows.
        f.write("by host time:\n" + table.table(sort_by="self_cpu_time_total", row_limit=40))


# ------------------------------------------------------------------------------------------------------
# the naive baseline


def naive_point(
    model: nn.Module, theta: torch.Tensor, loader: torch.utils.data.DataLoader, n: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """``(L(θ), ∇L(θ))`` the straightforward way: parameters set from θ, batches moved from the CPU,
    gradients accumulated in ``.grad``, then copied to the host as float64 numpy [K]. cuDNN at PyTorch's
    default (no autotuner), whatever the engine uses."""
    with torch.no_grad():  # copy in place: keeps each parameter's memory format (channels-last)
        for p, v in zip(model.parameters(), theta.split([p.numel() for p in model.parameters()])):
            p.copy_(v.view_as(p))
    model.zero_grad(set_to_none=True)
    loss_sum = 0.0
    with cudnn_benchmark(False):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device), reduction="sum")
            loss.backward()
            loss_sum += loss.item()
    grad = np.concatenate(
        [p.grad.detach().cpu().numpy().astype(np.float64).ravel() for p in model.parameters()]
    )
    return loss_sum / n, grad / n


def naive_replay(
    model: nn.Module,
    thetas: Sequence[torch.Tensor],
    x_cpu: torch.Tensor,
    y_cpu: torch.Tensor,
    chunk: int,
    integrator: str = "simpson",
    device: torch.device | str = "cpu",
    keep_param: bool = False,
) -> dict[str, Any]:
    """The naive LCA pipeline along ``thetas`` (θ_0 … θ_T): per iteration t, ``A = ḡ ⊙ (θ_{t+1} − θ_t)``.

    ``integrator``: ``simpson`` (ḡ = (g_t + 4 g_mid + g_{t+1}) / 6, two passes per iteration: midpoint
    and endpoint, the endpoint reused as the next start) or ``first_order`` (ḡ = g_t, one pass). Points
    are formed in float64 on the host and cast to the parameters' dtype, as the engine does. L is the
    engine's: ``model`` is deep-copied into LCA mode (dropout off, BN batch statistics, running statistics
    untouched), batches of ``chunk`` in order, with PyTorch's defaults (NCHW layout, ``cudnn.benchmark``
    off) whatever the engine uses. Returns per-iteration ``times`` [T] (s; the first point,
    θ_0, is primed untimed), ``total`` [T], ``loss0``/``loss1`` [T], ``error`` [T] (total − ΔL), the
    float64 running sums ``cum_param`` [K] and ``cum_total``, and ``param`` [T, K] with ``keep_param``.
    """
    if integrator not in ("simpson", "first_order"):
        raise ValueError(f"naive integrator {integrator!r}: use 'simpson' or 'first_order'")
    device = torch.device(device)
    # As one first writes it: the default NCHW layout (no channels-last), whatever the engine uses.
    m = lca_mode_copy(model).to(memory_format=torch.contiguous_format)
    dtype = next(m.parameters()).dtype
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_cpu.to(dtype), y_cpu), batch_size=chunk, shuffle=False
    )
    n = len(x_cpu)

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(torch.empty((), dtype=dtype).numpy().dtype)).to(device)

    th0 = thetas[0].detach().cpu().numpy().astype(np.float64)
    loss0, g0 = naive_point(m, to_dev(th0), loader, n, device)
    out: dict[str, Any] = {"times": [], "total": [], "loss0": [], "loss1": [], "error": [], "param": []}
    out["passes"] = 2 if integrator == "simpson" else 1  # per iteration: midpoint + endpoint
    cum_param = np.zeros_like(g0)
    cum_total = 0.0
    for t in range(1, len(thetas)):
        _sync(device)
        start = time.perf_counter()
        th1 = thetas[t].detach().cpu().numpy().astype(np.float64)
        delta = th1 - th0
        loss1, g1 = naive_point(m, to_dev(th1), loader, n, device)
        if integrator == "simpson":
            _, gm = naive_point(m, to_dev(th0 + 0.5 * delta), loader, n, device)
            gbar = (g0 + 4.0 * gm + g1) / 6.0
        else:
            gbar = g0
        a = gbar * delta
        total = float(a.sum())
        cum_param += a
        cum_total += total
        out["times"].append(time.perf_counter() - start)
        out["total"].append(total)
        out["loss0"].append(loss0)
        out["loss1"].append(loss1)
        out["error"].append(total - (loss1 - loss0))
        if keep_param:
            out["param"].append(a)
        th0, loss0, g0 = th1, loss1, g1
    out["cum_param"], out["cum_total"] = cum_param, cum_total
    out["param"] = np.stack(out["param"]) if keep_param else None
    return out


def naive_needs_fresh_process(o: BenchOptions) -> bool:
    """Whether the naive baseline runs in a fresh process (``o.naive_process``; auto: rows use cuDNN's
    autotuner on CUDA). PyTorch keeps one cuDNN plan per convolution shape for the life of the process
    (per thread; the backward's in the autograd engine's device thread), found by the first pass of that
    shape whatever ``cudnn.benchmark`` says later. After the engine's autotuned passes in chunks of the
    same shape, the baseline would reuse their algorithms instead of PyTorch's defaults (measured on an
    H200, ResNet-20 fp32 NCHW: 4.67 s per naive iteration after autotuned passes, 5.15–5.51 s in
    processes that had not autotuned those shapes)."""
    if o.naive_process != "auto":
        return o.naive_process == "on"
    return any(o.cudnn_benchmarks) and str(o.device).startswith("cuda")


def _naive_worker(path: str) -> dict[str, Any]:
    """The fresh process's side of :func:`naive_replay_fresh`: load the job from ``path`` and replay it."""
    job = torch.load(path, weights_only=False)  # written by this module's parent process just before
    device = job["device"]
    with matmul_precision(job["precision"]), cudnn_benchmark(False):
        return naive_replay(
            job["model"].to(device), job["thetas"], job["x_cpu"], job["y_cpu"], job["chunk"],
            job["integrator"], device, job["keep_param"],
        )  # fmt: skip


def naive_replay_fresh(
    model: nn.Module,
    thetas: Sequence[torch.Tensor],
    x_cpu: torch.Tensor,
    y_cpu: torch.Tensor,
    chunk: int,
    integrator: str,
    device: torch.device | str,
    keep_param: bool,
    precision: str,
) -> dict[str, Any]:
    """:func:`naive_replay` in a freshly spawned Python process, whose cuDNN has cached no plan, under
    ``precision``'s TF32 flags: the baseline as a new user's first script would run. The model and θs go
    over on the CPU; the result is the same dict."""
    ctx = multiprocessing.get_context("spawn")  # a fork would inherit this process's CUDA state
    job = {
        "model": copy.deepcopy(model).cpu(), "thetas": [t.detach().cpu() for t in thetas], "x_cpu": x_cpu,
        "y_cpu": y_cpu, "chunk": chunk, "integrator": integrator, "device": str(device),
        "keep_param": keep_param, "precision": precision,
    }  # fmt: skip
    # Through a file, not the pipe: pickled CPU tensors would go through /dev/shm, which containers keep
    # small (the CIFAR-shaped set is 553 MB).
    with tempfile.TemporaryDirectory(prefix="lca_bench_naive_") as tmp:
        path = os.path.join(tmp, "job.pt")
        torch.save(job, path)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(_naive_worker, path).result()


# ------------------------------------------------------------------------------------------------------
# one case and the whole run


def _cum_rel(errors: Sequence[float], l_start: float, l_end: float) -> float:
    dl = abs(l_end - l_start)
    return abs(sum(errors)) / dl if dl > 0 else float("inf")


def recompute_rate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int,
    method: str,
    o: BenchOptions,
    cl: bool,
    cuda_graph: bool = False,
    cudnn_bm: bool = False,
) -> dict[str, Any]:
    """Time :meth:`LCAEngine.steps` (batched path points) on a stored trajectory vs step by step.

    The trajectory is ``o.recompute_iters`` further SGD steps of ``model`` (kept on the device, as a
    recompute reads them from the run file ahead of the computation). Returns seconds per iteration
    for both, passes per iteration, and the largest difference between their totals. With
    ``cuda_graph`` the step-by-step passes are replayed CUDA graphs (``lca.cuda_graph`` with
    ``lca.batch_points=1`` in ``lca_lab.recompute``); the batched ``vmap`` passes are never graphed.
    """
    device = x.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(o.seed + 2)
    thetas = [torch.cat([p.detach().reshape(-1) for p in params])]
    for _ in range(o.recompute_iters):
        idx = torch.randint(0, len(x), (128,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        thetas.append(torch.cat([p.detach().reshape(-1) for p in params]))
    traj = torch.stack(thetas)
    fbl = FullBatchLoss(model, x, y, chunk, channels_last=cl, cuda_graph=cuda_graph, cudnn_benchmark=cudnn_bm)
    # As lca_lab.recompute: each row's per-layer sums come with its total
    ls = LayerSums(entry_layer_index(model).to(device), len(layer_groups(model)))
    B = batch_points_for(o)
    warm = traj[: min(B, len(traj) - 1) + 1]
    list(LCAEngine(fbl, method, o.tolerance, o.max_splits, layer_sums=ls).steps(warm, B))  # warm-up
    out: dict[str, Any] = {}
    # With B = 1 (the CPU default) the "batched" run is the sequential one: measured once.
    for name, b in (("batched", B), ("sequential", 1))[: 2 if B > 1 else 1]:
        _sync(device)
        t = time.perf_counter()
        steps = list(LCAEngine(fbl, method, o.tolerance, o.max_splits, layer_sums=ls).steps(traj, b))
        tot = torch.stack([s.total for s in steps]).tolist()
        _sync(device)
        out[f"recompute_{name}_s_per_it"] = (time.perf_counter() - t) / len(steps)
        out[f"recompute_{name}_passes_per_it"] = statistics.fmean(s.passes for s in steps)
        out[f"_tot_{name}"] = tot
    out["recompute_batch_points"] = B
    if B == 1:
        out["recompute_sequential_s_per_it"] = out["recompute_batched_s_per_it"]
        out["recompute_sequential_passes_per_it"] = out["recompute_batched_passes_per_it"]
        out["_tot_sequential"] = out["_tot_batched"]
    pairs = zip(out.pop("_tot_batched"), out.pop("_tot_sequential"))
    out["recompute_max_abs_diff"] = max(abs(a - b) for a, b in pairs)
    return out


def batch_points_for(o: BenchOptions) -> int:
    """``--batch-points``, or what ``lca_lab.recompute`` uses by default: 64 on a GPU, 1 on the CPU (where
    batching the points saves no launches and only multiplies the activation memory)."""
    if o.batch_points is not None:
        return int(o.batch_points)
    return 64 if str(o.device).startswith("cuda") else 1


def _storage_kinds(o: BenchOptions) -> list[str]:
    """The writer kinds the storage stall times: ``o.writers`` on a GPU; on the CPU ``train.py`` writes
    synchronously, one kind (``sync``)."""
    return list(o.writers) if str(o.device).startswith("cuda") else ["sync"]


def storage_stall(
    net: str,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    o: BenchOptions,
    cl: bool,
    cuda_graph: bool,
    cudnn_bm: bool = False,
    compiled: bool = False,
    profile_prefix: str | None = None,
) -> dict[str, Any]:
    """Cost of the run-file writer: the engine loop without and with it, alternately, ``o.storage_repeats``
    times (without, with, without, with, …), so that drift of the machine (clocks, other jobs) falls on
    both sides alike. Each loop is a fresh run of the same iterations; per pair, the stall is mean time per
    iteration with the writer ÷ without − 1; the order alternates between pairs (off-on, on-off, …). Returns
    the median stall over pairs and every pair's. With several writer kinds (``o.writers``: ``process``,
    ``thread``; on the CPU the writer is synchronous, ``sync``) each repeat runs the loop without the writer
    once and one loop per kind, in alternating order; the first kind's results have the plain
    ``storage_*`` keys, a second's ``storage_<kind>_*``.

    The same from median iteration times (``storage_stall_median_pct``) is the cost every iteration pays
    (buffering the rows); what the mean-based stall has beyond it comes from the few iterations that flush
    (stacking rows, the copy off the GPU, the writer thread). ``storage_stall_ms``: the median pair's
    difference of mean times per iteration (ms). ``storage_host_ms`` / ``storage_host_median_ms``: what
    the training thread spends in the writer's path per iteration (``append`` and the flushes it
    triggers; mean and median over a loop's iterations, median over the loops): on a loop bound by the
    host, the stall; on one bound by the GPU, hidden. Both loops take each step's per-layer LCA from the
    engine (``StepLCA.layer``, with the total in one product), as ``train.py`` does with or without
    per-parameter storage: the per-layer sums are the training loop's, not the writer's.

    ``profile_prefix``: the first pair's loops each profile ``max(5, o.flush_every)`` further iterations
    (so that one flush falls inside) into ``<prefix>_storage_off.txt`` and ``<prefix>_storage_on.txt``.
    """

    kinds = _storage_kinds(o)

    def loop(kind: str | None, profile: bool) -> tuple[float, float]:
        name = "off" if kind is None else "on" if kind == kinds[0] else f"on_{kind}"
        prof = f"{profile_prefix}_storage_{name}.txt" if profile else None
        with tempfile.TemporaryDirectory(prefix="lca_bench_") as tmp:
            res = engine_loop(
                net, x, y, method, o, cl, writer_dir=tmp if kind else None, cuda_graph=cuda_graph,
                file_process=kind == "process", cudnn_bm=cudnn_bm, compiled=compiled, profile_path=prof,
                profile_iters=max(5, o.flush_every),
            )  # fmt: skip
        if kind:
            host[kind].append(res["writer_host_s"])
        return statistics.fmean(res["times"]), statistics.median(res["times"])

    # per repeat: the loop without the writer and one per writer kind, in an order that alternates
    # (off, a, b; b, a, off; …) so that a linear drift of the machine falls on every side alike
    pairs: dict[str, list[tuple]] = {k: [] for k in kinds}
    host: dict[str, list[list[float]]] = {k: [] for k in kinds}
    for j in range(o.storage_repeats):
        order: list[str | None] = [None, *kinds]
        if j % 2:
            order.reverse()
        times = {k: loop(k, j == 0 and profile_prefix is not None) for k in order}
        off = times[None]
        for k in kinds:
            on = times[k]
            pairs[k].append((off, on, 100 * (on[0] / off[0] - 1), 100 * (on[1] / off[1] - 1)))
    out: dict[str, Any] = {"storage_writer": kinds[0]}
    for i, k in enumerate(kinds):
        pre = "storage_" if i == 0 else f"storage_{k}_"
        ps, hs = pairs[k], host[k]
        out.update({
            f"{pre}off_mean_s_per_it": statistics.median(p[0][0] for p in ps),
            f"{pre}on_mean_s_per_it": statistics.median(p[1][0] for p in ps),
            f"{pre}stall_pct": statistics.median(p[2] for p in ps),
            f"{pre}stall_pct_pairs": [p[2] for p in ps],
            f"{pre}stall_ms": 1e3 * statistics.median(p[1][0] - p[0][0] for p in ps),
            f"{pre}stall_median_pct": statistics.median(p[3] for p in ps),
            f"{pre}stall_median_pct_pairs": [p[3] for p in ps],
            # the writer's path on the training thread (append and its flushes), ms per iteration
            f"{pre}host_ms": 1e3 * statistics.median(statistics.fmean(h) for h in hs) if all(hs) else None,
            f"{pre}host_median_ms": (
                1e3 * statistics.median(statistics.median(h) for h in hs) if all(hs) else None
            ),
        })  # fmt: skip
    return out


def run_rate(
    net: str,
    precision: str,
    method: str,
    n_train: int,
    o: BenchOptions,
    cuda_graph: bool,
    cudnn_bm: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    """The real online loop: ``lca_lab.train.run`` (as ``python -m lca_lab`` runs it, W&B and figures off)
    on the bench's net, batch size and learning rate, with ``data=synthetic`` of the same shape and size
    (random labels, not the bench's teacher) and LCA over the first ``warmup + iters`` iterations.

    Returns ``run_s_per_it`` (median wall time of an LCA iteration: training step, LCA, reducers, per-layer
    sums and the run file's rows, per-parameter rows included), ``run_passes_per_it``, ``run_iters``.
    """
    from .train import run

    cfg = _run_cfg(net, precision, method, n_train, o, cuda_graph, cudnn_bm, compiled, o.warmup + o.iters)
    with tempfile.TemporaryDirectory(prefix="lca_bench_run_") as tmp:
        s = run(cfg, Path(tmp))
    return {
        "run_s_per_it": s["lca_s_per_iter"],
        "run_passes_per_it": s["grad_passes_per_iter"],
        "run_iters": s["lca_iters_timed"],
    }


# Ops that only make views or allocate: no kernel of their own.
_NO_KERNEL = frozenset(
    "aten::" + n
    for n in (
        "as_strided view slice select reshape expand unsqueeze squeeze empty empty_like empty_strided detach "
        "detach_ alias resize_ t transpose _reshape_alias lift_fresh numpy_T contiguous _unsafe_view narrow "
        "view_as split split_with_sizes unbind chunk flatten permute expand_as"
    ).split()
)
_LAUNCHES = frozenset(
    ["cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaMemcpyAsync"]
)


def ops_per_iteration(
    net: str,
    precision: str,
    method: str,
    o: BenchOptions,
    cuda_graph: bool,
    cudnn_bm: bool = False,
    compiled: bool = False,
    iters: int | None = None,
) -> dict[str, float]:
    """Ops per LCA iteration of the real training loop (``lca_lab.train.run``, set up as in :func:`run_rate`):
    one epoch of ``iters`` (default ``o.flush_every``) and one of ``2 · iters`` iterations, every one with
    LCA, each run under ``torch.profiler``; the difference of the counts divided by ``iters`` leaves out
    the set-up and the end and keeps one flush of the run file per ``flush_every`` rows. Both runs take
    the whole larger set (``2 · iters`` batches of synthetic data) as one chunk, so that a pass is the
    same ops in both: for a net whose own chunking splits the set, the count is that of one chunk.

    Returns ``run_ops_per_it``: top-level ``aten`` ops that are not views or allocations (each one kernel
    launch or more on a GPU, where a small net's loop is bound by the launches); on CUDA also
    ``run_launches_per_it``: the CUDA runtime's kernel launches, graph launches and async copies.
    """
    from .train import run

    n = int(iters or o.flush_every)
    batch = NET_SPECS[net]["batch"]

    def count(n_lca: int) -> tuple[int, int]:
        whole = 2 * n * batch
        cfg = _run_cfg(net, precision, method, n_lca * batch, o, cuda_graph, cudnn_bm, compiled, n_lca, whole)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if o.device.startswith("cuda"):
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with tempfile.TemporaryDirectory(prefix="lca_bench_ops_") as tmp:
            with torch.profiler.profile(activities=acts) as prof:
                run(cfg, Path(tmp))
        n_ops = n_launch = 0
        for e in prof.events():
            if e.name in _LAUNCHES:
                n_launch += 1
            elif e.name.startswith("aten::") and e.name not in _NO_KERNEL:
                par = e.cpu_parent
                while par is not None and not par.name.startswith("aten::"):
                    par = par.cpu_parent
                n_ops += par is None
        return n_ops, n_launch

    (o1, l1), (o2, l2) = count(n), count(2 * n)
    out = {"run_ops_per_it": (o2 - o1) / n}
    if o.device.startswith("cuda"):
        out["run_launches_per_it"] = (l2 - l1) / n
    return out


def _run_cfg(
    net: str,
    precision: str,
    method: str,
    n_train: int,
    o: BenchOptions,
    cuda_graph: bool,
    cudnn_bm: bool,
    compiled: bool,
    n_lca: int,
    chunk: int | str | None = None,
) -> dict[str, Any]:
    """The configuration of :func:`run_rate`'s run (``python -m lca_lab`` as composed by Hydra), with LCA
    over its first ``n_lca`` iterations, and the engine's chunk size ``chunk`` (default ``o.chunk_size``)."""
    from hydra import compose, initialize_config_dir  # the run's own configuration, as the CLI composes it
    from omegaconf import OmegaConf

    spec = NET_SPECS[net]
    batch = min(spec["batch"], n_train)
    epochs = math.ceil(n_lca / math.ceil(n_train / batch))
    cl = {"auto": "auto", "on": "true", "off": "false"}[o.channels_last]
    overrides = [
        f"device={o.device}", f"net={net}", "data=synthetic", f"data.shape={spec['data']}",
        f"data.size={n_train}", f"batch_size={batch}", f"epochs={epochs}", f"opt.lr={spec['lr']}",
        f"seed={o.seed}", "logger=none", "figures=false", "checkpoint.enabled=false",
        f"eval_every={10**9}", f"lca={method}", f"lca.precision={precision}",
        f"lca.cuda_graph={str(cuda_graph).lower()}", f"lca.cudnn_benchmark={str(cudnn_bm).lower()}",
        f"lca.compile={str(compiled).lower()}",
        f"lca.tolerance={o.tolerance}",
        f"lca.max_splits={o.max_splits}", f"lca.chunk_size={chunk or o.chunk_size}",
        f"lca.channels_last={cl}",
        f"lca.window=[0,{n_lca}]", f"store.flush_every={o.flush_every}",
    ]  # fmt: skip
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


def run_case(
    net: str,
    precision: str,
    method: str,
    data: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    o: BenchOptions,
    limits: dict[tuple[str, str, int, bool], dict[str, Any]],
    cuda_graph: bool = False,
    naive_cache: dict[tuple[str, str, str], dict[str, Any]] | None = None,
    cudnn_bm: bool = False,
    compiled: bool = False,
    channels_last: bool | None = None,
) -> dict[str, Any]:
    """Measure one net × precision × method × CUDA-graph × cuDNN-autotuner × compile setting → one row.

    ``channels_last`` None: from ``o.channels_last`` (auto: conv nets on CUDA); :func:`run_bench` passes
    the layout :func:`row_settings` decided.

    The limit is cached per net × precision × chunk, and the naive baseline per net × precision × method
    in ``naive_cache`` (it replays the trajectory, which does not depend on how the engine evaluates L).
    """
    device = torch.device(o.device)
    x, y, x_cpu, y_cpu = data[NET_SPECS[net]["data"]]
    cl = o.channels_last == "on" or (o.channels_last == "auto" and device.type == "cuda" and net in CONV_NETS)
    cl = cl if channels_last is None else channels_last
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    row: dict[str, Any] = {
        "net": net, "precision": precision, "method": method, "channels_last": cl, "n_train": len(x),
        "iters": o.iters, "warmup": o.warmup, "cuda_graph": cuda_graph, "cudnn_benchmark": cudnn_bm,
        "compile": compiled,
    }  # fmt: skip
    with matmul_precision(precision):  # the engine's switch: cuBLAS and cuDNN TF32 flags, restored
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        tag = (
            f"{net} {precision} {method}"
            + (" cuda-graph" if cuda_graph else "")
            + (" bm" if cudnn_bm else "")
            + (" compile" if compiled else "")
        )
        log(f"{tag}: engine, {o.warmup}+{o.iters} iterations")
        prof = None
        if o.profile_dir:
            prof = os.path.join(o.profile_dir, tag.replace(" ", "_") + ".txt")
        eng = engine_loop(
            net, x, y, method, o, cl, cuda_graph=cuda_graph, profile_path=prof, cudnn_bm=cudnn_bm,
            compiled=compiled,
        )  # fmt: skip
        row["compile_error"] = eng["compile_error"]
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        chunk = eng["chunk_size"]
        row["chunk_size"] = chunk
        key = (net, precision, chunk, cl)
        if key not in limits:
            log(f"{net} {precision}: limit (full passes, chunk {chunk} and whole set)")
            limits[key] = measure_limit(
                eng["model"], x, y, chunk, o.limit_repeats, o.whole_chunk, any(o.cuda_graphs), cl,
                o.cudnn_benchmarks, any(o.compiles),
            )  # fmt: skip
        row.update(limits[key])
        t_eng = statistics.median(eng["times"])
        passes = statistics.fmean(eng["passes"])
        row.update(
            engine_s_per_it=t_eng,
            engine_mean_s_per_it=statistics.fmean(eng["times"]),
            engine_times_s=eng["times"],
            passes_per_it=passes,
            mean_splits=statistics.fmean(eng["splits"]),
            # Mean time with mean passes: where passes vary (trapezoid, refinement) the median iteration
            # is a cheap one, and median time against mean passes would overstate the efficiency.
            efficiency=passes * row["limit_s"] / statistics.fmean(eng["times"]),
            max_abs_error=max(abs(e) for e in eng["error"]),
            cum_rel_error=_cum_rel(eng["error"], eng["loss0"][0], eng["loss1"][-1]),
            L_start=eng["loss0"][0],
            L_end=eng["loss1"][-1],
        )
        row["engine_total"] = eng["total"]
        if o.recompute_iters and not has_batchnorm(eng["model"]):
            log(f"{tag}: recompute of {o.recompute_iters} stored steps, {batch_points_for(o)} points/pass")
            row.update(recompute_rate(eng["model"], x, y, chunk, method, o, cl, cuda_graph, cudnn_bm))
        if o.keep_param:
            row["engine_param"] = eng["param"]

        if o.naive:
            k = min(o.naive_iters or DEFAULT_NAIVE_ITERS[net], o.iters)
            integ = "first_order" if method == "first_order" else "simpson"
            nkey = (net, precision, method)
            nv = (naive_cache or {}).get(nkey)
            if nv is None:
                fresh = naive_needs_fresh_process(o)
                log(
                    f"{tag}: naive baseline ({integ}), {k} iterations on the same trajectory"
                    + (", in a fresh process" if fresh else "")
                )
                if fresh:
                    nv = naive_replay_fresh(
                        eng["model"], eng["thetas"][: k + 1], x_cpu, y_cpu, chunk, integ, device,
                        o.keep_param, precision,
                    )  # fmt: skip
                else:
                    nv = naive_replay(
                        eng["model"], eng["thetas"][: k + 1], x_cpu, y_cpu, chunk, integ, device, o.keep_param
                    )
                nv["fresh_process"] = fresh
                nv["thetas"] = eng["thetas"][: k + 1]
                if naive_cache is not None:
                    naive_cache[nkey] = nv
            t_naive = statistics.median(nv["times"])
            # A cached baseline replayed the first row's trajectory. On a GPU the training steps are not
            # bitwise reproducible (cuDNN's backward may use atomics), so a later row may have trained
            # another one: then the totals are not comparable (the times still are).
            same_path = len(nv["thetas"]) == k + 1 and all(
                torch.equal(a, b) for a, b in zip(nv["thetas"], eng["thetas"][: k + 1])
            )
            diffs = [abs(a - b) for a, b in zip(nv["total"], eng["total"][:k])]
            # Same integrator, same points: first order always; RK4 where the engine did not refine beyond
            # 2 splits. Other methods (e.g. trapezoid) only agree to within the tolerance.
            same = same_path and (method == "first_order" or method == "rk4")
            comparable = [d for d, s in zip(diffs, eng["splits"]) if method == "first_order" or s == 2]
            row.update(
                naive_iters=k,
                naive_integrator=integ,
                naive_s_per_it=t_naive,
                speedup=t_naive / t_eng,
                # per gradient pass: separates the pipeline's cost from the engine's choice of points
                speedup_per_pass=(t_naive / nv["passes"]) / (t_eng / passes),
                naive_max_abs_diff=max(comparable) if same and comparable else None,
                naive_vs_engine_max_abs=max(diffs) if same_path else None,
                naive_same_trajectory=same_path,
                naive_fresh_process=nv["fresh_process"],
                naive_total=nv["total"],
            )
            if o.keep_param:
                row["naive_param"] = nv["param"]

        if o.run:
            log(f"{tag}: the training loop of python -m lca_lab, {o.warmup}+{o.iters} LCA iterations")
            row.update(run_rate(net, precision, method, len(x), o, cuda_graph, cudnn_bm, compiled))

        if o.count_ops:
            log(
                f"{tag}: ops per LCA iteration of the training loop (profiled runs of {o.flush_every} and "
                f"{2 * o.flush_every} iterations)"
            )
            row.update(ops_per_iteration(net, precision, method, o, cuda_graph, cudnn_bm, compiled))
            launches = row.get("run_launches_per_it")
            log(
                f"{tag}: {row['run_ops_per_it']:.1f} ops per LCA iteration"
                + (f", {launches:.1f} CUDA launches" if launches is not None else "")
            )

        if o.storage:
            log(f"{tag}: storage stall, {o.storage_repeats} pairs of loops without/with the writer")
            prefix = os.path.join(o.profile_dir, tag.replace(" ", "_")) if o.profile_dir else None
            row.update(storage_stall(net, x, y, method, o, cl, cuda_graph, cudnn_bm, compiled, prefix))
            for i, kind in enumerate(_storage_kinds(o)):
                pre = "storage_" if i == 0 else f"storage_{kind}_"
                if row[f"{pre}host_ms"] is not None:
                    log(
                        f"{tag}: stall ({kind} writer) {row[f'{pre}stall_pct']:+.1f}/"
                        f"{row[f'{pre}stall_median_pct']:+.1f}%, {row[f'{pre}stall_ms']:.3f} ms/it; the "
                        f"writer's path on the training thread {row[f'{pre}host_ms']:.3f} ms/it (median "
                        f"iteration {row[f'{pre}host_median_ms']:.3f})"
                    )
        del eng
    return row


_SWITCH = {"auto": "auto", "on": True, "off": False}


def row_settings(o: BenchOptions, net: str, precision: str) -> list[PassSettings]:
    """The settings of ``net``'s rows in ``precision``: one per combination of ``o.cuda_graphs``,
    ``o.cudnn_benchmarks`` and ``o.compiles`` (rows whose auto came out the same are one row), each auto
    (None; ``o.channels_last`` auto) decided by :func:`lca_lab.speed.pass_settings` as ``python -m lca_lab``
    decides it on this device. An explicit ``--channels-last on`` keeps its meaning here: NHWC inputs for
    every net, conv or not."""
    spec = NET_SPECS[net]
    torch.manual_seed(0)
    # only its kinds of module are read
    shape = DATA_SHAPES[spec["data"]][1]
    model = getattr(nets, net)(input_shape=shape, n_classes=N_CLASSES, **spec["kwargs"])
    out: list[PassSettings] = []
    for graph in o.cuda_graphs:
        for bm in o.cudnn_benchmarks:
            for tc in o.compiles:
                asked = {"cuda_graph": graph, "cudnn_benchmark": bm, "compile": tc}
                lcfg = {k: "auto" if v is None else v for k, v in asked.items()}
                lcfg |= {"channels_last": _SWITCH[o.channels_last], "precision": precision}
                ps = pass_settings(model, torch.device(o.device), lcfg)
                if o.channels_last == "on":
                    ps = dataclasses.replace(ps, channels_last=True)
                if all(ps.engine_kwargs() != q.engine_kwargs() for q in out):
                    out.append(ps)
    return out


def run_bench(o: BenchOptions) -> dict[str, Any]:
    """Run every case of ``o``; return ``{"device", "torch", "date", "options", "rows": [...]}``."""
    check_options(o)
    device = torch.device(o.device)
    data: dict[str, Any] = {}
    for shape in sorted({NET_SPECS[n]["data"] for n in o.nets}):
        n = o.n_train or DATA_SHAPES[shape][0]
        log(f"synthetic {shape}-shaped data: {n} × {DATA_SHAPES[shape][1]}")
        x_cpu, y_cpu = make_data(shape, n, o.seed)
        data[shape] = (x_cpu.to(device), y_cpu.to(device), x_cpu, y_cpu)
    limits: dict[tuple[str, str, int, bool], dict[str, Any]] = {}
    naive_cache: dict[tuple[str, str, str], dict[str, Any]] = {}
    rows = []
    # PyTorch's default, as in a fresh `python -m lca_lab`: the rows' setting applies to the engine's passes.
    with cudnn_benchmark(False):
        for net in o.nets:
            for precision in o.precisions:
                cases = row_settings(o, net, precision)
                # the rows' settings as resolved for this net (the limit's passes and the naive's process)
                on = asdict(o) | {
                    "cuda_graphs": sorted({c.cuda_graph for c in cases}),
                    "cudnn_benchmarks": sorted({c.cudnn_benchmark for c in cases}),
                    "compiles": sorted({c.compile for c in cases}),
                }
                o_net = BenchOptions(**on)
                for method in o.methods:
                    for c in cases:
                        row = run_case(
                            net, precision, method, data, o_net, limits, c.cuda_graph, naive_cache,
                            c.cudnn_benchmark, c.compile, channels_last=c.channels_last,
                        )  # fmt: skip
                        row["speed_reason"] = c.reason
                        rows.append(row)
    out = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": {k: v for k, v in asdict(o).items() if k != "keep_param"},
        "rows": rows,
    }
    if o.layer_sums:
        out["layer_sums"] = [layer_sums_cost(net, data[NET_SPECS[net]["data"]][0], o.seed) for net in o.nets]
    if o.writer_pauses:
        out["writer_pauses"] = [writer_pauses(net, data[NET_SPECS[net]["data"]][2], o) for net in o.nets]
    return out


def _python_work(n: int) -> int:
    """``n`` steps of pure Python: a stand-in for a loop bound by its Python thread."""
    s = 0
    for i in range(n):
        s += i
    return s


def writer_pauses(
    net: str, x: torch.Tensor, o: BenchOptions, flushes: int = 20, iter_ms: float = 2.0, repeats: int = 5
) -> dict[str, Any]:
    """What the run writer's background flushes cost a training loop bound by its Python thread.

    The loop's stand-in: per iteration ``iter_ms`` of pure Python (calibrated; a small net's GPU loop is
    its Python thread launching kernels, which holds the GIL), then the ``append`` of one LCA row of
    ``net``'s size (per-parameter float32 [K], per-layer, scalars; host rows, so the copy off a GPU is
    not part of this) to a :class:`RunWriter` with ``background=True``; ``flushes × o.flush_every``
    iterations. Its wall time against the same loop without a writer is what the writer cost it: the
    training thread's own path (``append``, a flush's stacking) and every pause the writer's thread or
    process caused it (the GIL handed over at each h5py call of a writer thread; on a machine with few
    cores, the CPU time they take). Kinds (``o.writers``: HDF5 calls in the writer ``thread``, or in its
    child ``process``) and the loop without alternate, ``repeats`` times.

    Returns ``K``, ``flush_every``, ``iter_ms``, ``none_ms_per_it`` (the loop without, median) and per
    kind ``<kind>_ms_per_flush`` (wall time with − without, per flush; median over repeats),
    ``<kind>_pct`` (with ÷ without − 1, %; median) and ``<kind>_flush_ms`` (median wall time of a flush
    in the writer's thread, the writing included).
    """
    from .store import RunWriter  # h5py only when asked

    model = _build(net, tuple(x.shape[1:]), o.seed, torch.device("cpu"), False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = layer_groups(model)
    K = sum(p.numel() for _, p in named)
    rng = np.random.default_rng(o.seed)
    param = rng.standard_normal(K).astype(np.float32)
    layer = rng.standard_normal(len(groups))
    n_it = flushes * o.flush_every
    probe = 100_000
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        _python_work(probe)
        rates.append((time.perf_counter() - t0) / probe)
    n_work = max(1, int(iter_ms / 1e3 / statistics.median(rates)))

    def loop(kind: str | None) -> tuple[float, list[float]]:
        flush_s: list[float] = []
        with tempfile.TemporaryDirectory(prefix="lca_bench_") as tmp:
            writer = None
            if kind is not None:
                writer = RunWriter(
                    os.path.join(tmp, "lca.h5"), param_names=[n for n, _ in named],
                    param_shapes=[tuple(p.shape) for _, p in named], param_layer=param_layer_index(model),
                    layer_names=[g[0] for g in groups], attrs={"config": "bench"}, flush_every=o.flush_every,
                    expected_rows=n_it, background=True, file_process=kind == "process",
                )  # fmt: skip
                writer.write_initial(1.0)
                writer.wait()  # the child started and row 0 written before the clock starts
                writer.transport.on_write = flush_s.append  # wall time of each run of the writer thread
            t0 = time.perf_counter()
            for it in range(n_it):
                _python_work(n_work)
                if writer is not None:
                    writer.append(it, 1.0, 0.5, 1e-5, 1, True, layer, param)
            elapsed = time.perf_counter() - t0
            if writer is not None:
                writer.close()
        return elapsed, flush_s

    kinds = list(o.writers)
    res: dict[str | None, list[tuple[float, list[float]]]] = {k: [] for k in (None, *kinds)}
    for j in range(repeats):
        order: list[str | None] = [None, *kinds]
        for k in order[::-1] if j % 2 else order:
            res[k].append(loop(k))
    none = [t for t, _ in res[None]]
    out: dict[str, Any] = {
        "net": net, "K": K, "flush_every": o.flush_every, "iter_ms": iter_ms, "flushes": flushes,
        "none_ms_per_it": 1e3 * statistics.median(none) / n_it,
    }  # fmt: skip
    for k in kinds:
        out[f"{k}_ms_per_flush"] = 1e3 * statistics.median(
            (t - t0) / flushes for (t, _), t0 in zip(res[k], none, strict=True)
        )
        out[f"{k}_pct"] = 100 * statistics.median(t / t0 - 1 for (t, _), t0 in zip(res[k], none, strict=True))
        out[f"{k}_flush_ms"] = 1e3 * statistics.median(s for _, fs in res[k] for s in fs[1:] or fs)
    log(
        f"{net}: a busy Python loop, {iter_ms:g} ms iterations, a flush every {o.flush_every} rows (K={K}): "
        + ", ".join(
            f"{k} {out[k + '_ms_per_flush']:+.2f} ms per flush ({out[k + '_pct']:+.2f} %)" for k in kinds
        )
    )
    return out


def layer_sums_cost(net: str, x: torch.Tensor, seed: int = 0, calls: int = 50) -> dict[str, Any]:
    """Cost of what every online iteration sums by layer, for ``net``'s real layer index [K]: the
    per-layer LCA (a [K] float32 vector → [n_layers] float64) and the reducer's per-layer counts of helping
    and hurting entries (a [2, K] 0/1 array), each way :class:`LayerSums` can take (``index_add_``:
    atomic adds into n_layers slots, the way they were computed before; ``prefix``; ``dense``, where the
    net's K × n_layers allows it) → ``<way>_us`` and ``counts_<way>_us``, microseconds per call. And what
    the engine adds to a step for its total and per-layer LCA (a [K] float64 vector): ``sum_then_layers``
    (``x.sum()``, then the sums: the engine's total and the training loop's sums, before) and
    ``with_total`` (:meth:`LayerSums.with_total`, one product for both), with ``total_abs_diff``, the
    largest difference of their totals (rounding).

    On CUDA two numbers per way: the summed kernel time of ``calls`` calls from ``torch.profiler`` (the
    GPU's share), and ``<…>_wall_us``, the wall time per call of ``calls`` calls queued back to back
    (launches included: what a launch-bound loop pays); on the CPU the wall time. Also checks that every
    way gives the same sums (``max_abs_diff``) and names the way :class:`LayerSums` takes (``strategy``).
    """
    device = x.device
    model = _build(net, tuple(x.shape[1:]), seed, device, False)
    index = entry_layer_index(model).to(device)
    n, K = len(layer_groups(model)), index.numel()
    gen = torch.Generator().manual_seed(seed)
    lca = torch.randn(K, generator=gen).to(device)
    lca64 = lca.double()  # the engine's per-parameter LCA is float64
    sign = torch.sign(lca).to(torch.int8)
    chosen, prefix, dense = LayerSums(index, n), LayerSums(index, n, dense=False), LayerSums(index, n, True)
    ways = {"prefix": prefix} | ({"dense": dense} if dense.strategy == "dense" else {})
    slot, ones = index * 3 + 1, torch.ones((), dtype=torch.float64, device=device).expand(K)
    helped_hurt = torch.stack([sign.clamp(max=0).neg_(), sign.clamp(min=0)])
    cases = {
        "index_add": lambda: torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, index, lca64),
        **{w: (lambda s=s: s(lca)) for w, s in ways.items()},
        "counts_index_add": lambda: torch.zeros(3 * n, dtype=torch.float64, device=device).index_add_(
            0, slot + sign, ones
        ),
        **{f"counts_{w}": (lambda s=s: s(helped_hurt)) for w, s in ways.items()},
        "sum_then_layers": lambda: (lca64.sum(), chosen(lca64)),
        "with_total": lambda: chosen.with_total(lca64)[::-1],
    }
    ref = cases["index_add"]()
    diff = max((cases[w]() - ref).abs().max().item() for w in ways)
    (t_sum, l_sum), (t_one, l_one) = cases["sum_then_layers"](), cases["with_total"]()
    diff = max(diff, (l_one - ref).abs().max().item(), (l_sum - ref).abs().max().item())
    out: dict[str, Any] = {
        "net": net, "K": K, "layers": n, "strategy": chosen.strategy, "max_abs_diff": diff,
        "total_abs_diff": (t_one - t_sum).abs().item(),
    }  # fmt: skip
    for name, fn in cases.items():
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        wall_us = 1e6 * (time.perf_counter() - t) / calls
        if device.type == "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                _sync(device)
            out[f"{name}_us"] = sum(e.self_device_time_total for e in prof.key_averages()) / calls
            out[f"{name}_wall_us"] = wall_us
        else:
            out[f"{name}_us"] = wall_us
    log(
        f"{net} layer sums (K={K}, {n} layers, LayerSums takes {chosen.strategy!r}): "
        + ", ".join(f"{k} {v:.1f} µs" for k, v in out.items() if k.endswith("_us"))
    )
    return out


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (<processor>, N threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    proc = platform.processor() or platform.machine()
    return f"cpu ({proc}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ------------------------------------------------------------------------------------------------------
# output


def _fmt(v: Any, scale: float = 1.0, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v * scale, spec)


def _recompute_cell(r: dict[str, Any]) -> str:
    """Batched recompute ms/it, and "/step-by-step" where the two were measured separately (B > 1)."""
    batched = _fmt(r.get("recompute_batched_s_per_it"), 1e3, ".2f")
    if (r.get("recompute_batch_points") or 1) > 1:
        return f"{batched}/{_fmt(r.get('recompute_sequential_s_per_it'), 1e3, '.2f')}"
    return batched


COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("net", "<", lambda r: r["net"]),
    (
        "prec",
        "<",
        lambda r: (
            r["precision"]
            + ("/cl" if r["channels_last"] else "")
            + ("/graph" if r.get("cuda_graph") else "")
            + ("/bm" if r.get("cudnn_benchmark") else "")
            + ("/tc" if r.get("compile") else "")
        ),
    ),
    ("method", "<", lambda r: r["method"]),
    ("chunk", ">", lambda r: str(r["chunk_size"])),
    ("limit ms", ">", lambda r: _fmt(r["limit_s"], 1e3, ".2f")),
    (
        "chunk/whole ms",
        ">",
        lambda r: (
            f"{_fmt(r['limit_chunk_s'], 1e3, '.2f')}"
            + (f"/{_fmt(r['limit_chunk_bm_s'], 1e3, '.2f')}b" if r.get("limit_chunk_bm_s") else "")
            + f"/{_fmt(r['limit_whole_s'], 1e3, '.2f')}"
            + (f"/{_fmt(r['limit_graph_s'], 1e3, '.2f')}g" if r.get("limit_graph_s") else "")
            + (f"/{_fmt(r['limit_compiled_s'], 1e3, '.2f')}c" if r.get("limit_compiled_s") else "")
        ),
    ),
    ("engine ms/it", ">", lambda r: _fmt(r["engine_s_per_it"], 1e3, ".2f")),
    ("passes/it", ">", lambda r: _fmt(r["passes_per_it"], 1, ".2f")),
    ("eff", ">", lambda r: _fmt(r["efficiency"], 1, ".2f")),
    ("run ms/it", ">", lambda r: _fmt(r.get("run_s_per_it"), 1e3, ".2f")),
    ("naive ms/it", ">", lambda r: _fmt(r.get("naive_s_per_it"), 1e3, ".2f")),
    ("speed-up", ">", lambda r: _fmt(r.get("speedup"), 1, ".1f")),
    ("x/pass", ">", lambda r: _fmt(r.get("speedup_per_pass"), 1, ".1f")),
    ("|naive−eng|", ">", lambda r: _fmt(r.get("naive_max_abs_diff"), 1, ".1e")),
    ("max|err|", ">", lambda r: _fmt(r["max_abs_error"], 1, ".1e")),
    ("cum rel err", ">", lambda r: _fmt(r["cum_rel_error"], 100, ".3f") + "%"),
    ("peak MiB", ">", lambda r: _fmt(r["peak_mib"], 1, ".0f")),
    ("recomp ms/it", ">", lambda r: _recompute_cell(r)),
    (
        "stall",
        ">",
        lambda r: (
            f"{r['storage_stall_pct']:+.1f}/{r['storage_stall_median_pct']:+.1f}%"
            if "storage_stall_pct" in r
            else "—"
        ),
    ),
]


def format_table(result: dict[str, Any]) -> str:
    """The result rows as a fixed-width text table with a header line naming the device."""
    cells = [[f(r) for _, _, f in COLUMNS] for r in result["rows"]]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (h, _, _) in enumerate(COLUMNS)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(format(v, f"{a}{w}") for v, (_, a, _), w in zip(vals, COLUMNS, widths))

    o = result["options"]
    head = (
        f"lca_lab.bench on {result['device']}, torch {result['torch']}, {result['date']}; "
        f"{o['warmup']}+{o['iters']} iterations, tolerance {o['tolerance']}"
    )
    lines = [head, line([h for h, _, _ in COLUMNS]), line(["-" * w for w in widths])] + [
        line(c) for c in cells
    ]
    if result.get("layer_sums"):
        cuda = result["device"].startswith("cuda")
        unit = "GPU kernel time, and wall time of calls queued back to back" if cuda else "wall time"
        lines += ["", f"per-layer sums, µs per call ({unit}); * the way LayerSums takes for the net"]

        def cell(r: dict[str, Any], key: str) -> str:
            if f"{key}_us" not in r:
                return "—"
            mark = "*" if key.removeprefix("counts_") == r["strategy"] else ""
            wall = f" ({r[key + '_wall_us']:.1f})" if cuda else ""
            return f"{mark}{r[key + '_us']:.1f}{wall}"

        for r in result["layer_sums"]:
            lines.append(
                f"{r['net']:<9} K={r['K']:<8} layers={r['layers']:<3} "
                + "  ".join(
                    f"{what} index_add_ {cell(r, p + 'index_add')} / prefix {cell(r, p + 'prefix')} / "
                    f"dense {cell(r, p + 'dense')}"
                    for what, p in (("LCA", ""), ("counts", "counts_"))
                )
                + f"   |diff| {r['max_abs_diff']:.1e}"
            )
            if "with_total_us" in r:
                lines.append(
                    f"{'':<9} a step's total and LCA by layer: sum, then the sums "
                    f"{cell(r, 'sum_then_layers')} / one product (with_total) {cell(r, 'with_total')}"
                    f"   total |diff| {r['total_abs_diff']:.1e}"
                )
    if result.get("writer_pauses"):
        lines += [
            "",
            "the run writer's cost to a loop bound by its Python thread (--writer-pauses): wall time with "
            "the writer − without, ms per flush and % (a flush's own time in the writer)",
        ]
        for r in result["writer_pauses"]:
            kinds = [k.removesuffix("_flush_ms") for k in r if k.endswith("_flush_ms")]
            lines.append(
                f"{r['net']:<9} K={r['K']:<8} flush every {r['flush_every']} rows, "
                f"{r['none_ms_per_it']:.2f} ms per iteration: "
                + " / ".join(
                    f"{k} {r[k + '_ms_per_flush']:+.2f} ms ({r[k + '_pct']:+.1f} %; "
                    f"flush {r[k + '_flush_ms']:.1f} ms)"
                    for k in kinds
                )
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--ranks" or a.startswith("--ranks=") for a in argv):
        return _main_ranks(argv)
    if "--loops" in argv:
        return _main_loops(argv)
    if "--estimate" in argv:  # subset estimates against the exact LCA (lca_lab.bench_estimate)
        from .bench_estimate import main as estimate_main

        return estimate_main(argv)
    o = parse_args(argv)
    json_path = getattr(o, "json_path", None)
    if json_path:  # fail on an unwritable path before minutes of compute, not after
        folder = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            print(
                f"error: --json {json_path}: folder {folder} does not exist or is not writable",
                file=sys.stderr,
            )
            return 2
    result = run_bench(o)
    print(format_table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(jsonable(result), f, indent=1)
        log(f"wrote {json_path}")
    return 0


def _main_ranks(argv: Sequence[str]) -> int:
    """``--ranks N``: L's pass on N ranks against one, measured side by side (:mod:`lca_lab.bench_ranks`)."""
    p = argparse.ArgumentParser(prog="python -m lca_lab.bench --ranks N", description=_main_ranks.__doc__)
    p.add_argument("--ranks", type=int, required=True, help="ranks (processes) sharing the pass, ≥ 2")
    p.add_argument("--nets", default="lenet", help="comma list of fc,lenet,resnet20 (default lenet)")
    p.add_argument(
        "--n-train", type=int, default=4096, help="examples (default 4096: ≈ 1 s per pass on 1 core)"
    )
    p.add_argument("--iters", type=int, default=5, help="timed passes (median; default 5)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL with one GPU per rank)")
    p.add_argument("--json", "--out", dest="json_path", help="also write the results as JSON to this path")
    a = p.parse_args(argv)
    from . import bench_ranks

    nets = _csv(a.nets)
    bad = [n for n in nets if n not in bench_ranks.NETS]
    if a.ranks < 2 or bad or a.n_train < a.ranks or a.iters < 1:
        print(
            f"error: --ranks must be ≥ 2 (got {a.ranks}), --nets from {','.join(bench_ranks.NETS)}"
            f"{' (got ' + ','.join(bad) + ')' if bad else ''}, --n-train ≥ --ranks, --iters ≥ 1",
            file=sys.stderr,
        )
        return 2
    rows = []
    for net in nets:
        r = bench_ranks.scaling(net, a.ranks, a.n_train, a.iters, a.device)
        print(bench_ranks.format_scaling(r))
        rows.append(r)
    _write_result(a, torch.device(a.device), {"scaling": rows})
    return 0


def _main_loops(argv: Sequence[str]) -> int:
    """``--loops``: LCA inside lca_lab's loop, track(), Lightning and the HF Trainer, side by side
    (:mod:`lca_lab.bench_loops`)."""
    p = argparse.ArgumentParser(prog="python -m lca_lab.bench --loops", description=_main_loops.__doc__)
    p.add_argument("--loops", action="store_true", required=True)
    p.add_argument("--which", default="own,track,lightning,hf", help="comma list of own,track,lightning,hf")
    p.add_argument("--n-train", type=int, default=4096, help="examples (default 4096)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the loops (default 3)")
    p.add_argument("--json", "--out", dest="json_path", help="also write the results as JSON to this path")
    a = p.parse_args(argv)
    from . import bench_loops

    loops = _csv(a.which)
    bad = [x for x in loops if x not in bench_loops.LOOPS]
    steps = a.epochs * math.ceil(a.n_train / max(a.batch, 1))
    if bad or a.batch < 1 or steps < 8 or a.repeats < 1:
        print(
            f"error: --which from {','.join(bench_loops.LOOPS)}"
            f"{' (got ' + ','.join(bad) + ')' if bad else ''}; "
            f"--batch ≥ 1, --repeats ≥ 1 and at least 8 steps (--epochs × --n-train / --batch, got {steps})",
            file=sys.stderr,
        )
        return 2
    rows = bench_loops.measure(loops, a.n_train, a.batch, a.epochs, repeats=a.repeats)
    print(bench_loops.format_loops(rows))
    _write_result(a, torch.device("cpu"), {"versions": bench_loops.versions(), "loops": rows})
    return 0


def _write_result(a: argparse.Namespace, device: torch.device, rows: dict[str, Any]) -> None:
    """The provenance header (device, versions, commit, date, options) and ``rows``, to ``--json``."""
    from .train import git_sha

    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": vars(a),
        **rows,
    }
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(jsonable(result), f, indent=1)
        log(f"wrote {a.json_path}")


if __name__ == "__main__":
    sys.exit(main())
