"""The LCA engine: full-training-set loss and gradient, and the path integral along one step.

Definitions (see README "What the numbers mean"):

* ``L(θ)`` is the mean loss over the *whole* training split, evaluated in fixed, unshuffled chunks
  of ``chunk_size`` examples. Dropout is off; BatchNorm runs in train mode (batch statistics of
  each chunk) and its running statistics are never touched. ``L`` is therefore a pure function of
  θ, and the chunk size is part of its definition when the net has BatchNorm.
* For one training step θ_t → θ_{t+1} (Δ = θ_{t+1} − θ_t), ``A[i] = ḡ_i · Δ_i`` where ḡ is the
  composite-Simpson average of ∇L along the straight segment (weights 1,4,1 for 2 splits;
  1,4,2,4,1 for 4; …). First order uses ḡ = ∇L(θ_t). Σ_i A[i] approximates L(θ_{t+1}) − L(θ_t);
  the difference is the residual error of that step.
* Adaptive refinement doubles the number of Simpson sub-intervals (reusing every gradient
  already computed) while |Σ A − ΔL| > ``tolerance``, up to ``max_splits``.
* ``trapezoid`` first tries ḡ = (∇L(θ_t) + ∇L(θ_{t+1}))/2, which needs only the endpoint gradient
  (reused as the next step's start): one full pass per iteration instead of RK4's two. Where its
  measured residual exceeds ``tolerance`` it escalates to Simpson (adding the midpoint) and refines
  as above, so the per-iteration guarantee is the same.

This module imports torch only; it works on any ``nn.Module`` with any loss of the form
``loss_fn(logits, y, reduction="sum")``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .dist import SINGLE, Shard
from .examples import (
    IGNORE,
    CachedExamples,
    Examples,
    StreamedExamples,
    args_kwargs,
    call,
    target_loss,
    tree_leaves,
    tree_len,
    tree_map,
)

METHODS = ("first_order", "trapezoid", "rk4")
PRECISIONS = ("fp32", "tf32")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@contextlib.contextmanager
def lca_eval_mode(model: nn.Module, modules: Sequence[nn.Module] | None = None):
    """Put ``model`` in the mode that defines ``L(θ)``; restore every flag on exit.

    Every module in eval mode (``training = False``: dropout off, also where a module reads its own flag
    instead of holding an ``nn.Dropout``, as Hugging Face's GPT-2 attention does), except BatchNorm: train
    mode (batch statistics) with ``track_running_stats`` off, so the forward pass neither reads nor
    updates running statistics. ``modules``: the model's modules when the caller has listed them already
    (:func:`mode_modules`). Flags are set one module at a time (no recursive ``eval()``), which keeps the
    per-pass cost small for launch-bound nets.
    """
    mods = mode_modules(model) if modules is None else modules
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in mods]
    try:
        for m in mods:
            if isinstance(m, _BN_TYPES):
                m.training = True
                m.track_running_stats = False
            else:
                m.training = False
        yield model
    finally:
        for m, training, trs in saved:
            m.training = training
            if trs is not None:
                m.track_running_stats = trs


def mode_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose mode :func:`lca_eval_mode` sets: all of them, in model order."""
    return list(model.modules())


def set_matmul_precision(mode: str) -> None:
    """Set float32 matmuls and cuDNN convolutions to ``fp32`` (exact IEEE) or ``tf32`` globally.

    PyTorch's defaults differ (matmul TF32 off, cuDNN TF32 on), so both flags are set. See
    :func:`matmul_precision` for a scoped version.
    """
    if mode not in PRECISIONS:
        raise ValueError(f"lca.precision={mode!r} is not one of {list(PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"


@contextlib.contextmanager
def matmul_precision(mode: str):
    """Run a block with float32 matmuls/convolutions in ``fp32`` (exact IEEE) or ``tf32`` mode.

    PyTorch's own defaults differ between matmuls (TF32 off) and cuDNN convolutions (TF32 on), so
    both flags are set explicitly; they are restored on exit. No effect on CPU or float64 tensors.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_matmul_precision(mode)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """Run a block with ``torch.backends.cudnn.benchmark`` set to ``on``; restored on exit.

    On: cuDNN times its algorithms for each new convolution shape and keeps the fastest; off:
    PyTorch's default, cuDNN's heuristics. No effect on the CPU.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def tied_aliases(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str]]:
    """(alias, name) for every further name under which a parameter of ``names`` is registered (tied
    weights: one Parameter in several modules; ``named_parameters()`` lists it under its first name)."""
    first: dict[int, str] = {}
    covered = set(names)
    out = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = n
        elif first[id(p)] in covered:
            out.append((n, first[id(p)]))
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN_TYPES) for m in model.modules())


# On the CPU, the largest activation of one chunk is kept under this size. glibc's malloc serves larger
# blocks by mmap and returns them to the kernel when freed, so every pass page-faults its activations in
# again and the kernel zero-fills them: LeNet, 5,500 examples, 2 cores: 5.1 s per pass in chunks of 5000
# (3.5 s of it system time) vs 2.7 s in chunks of 250 (no system time); MNIST-FC, whose largest
# activation is 100 floats per example, is fastest in chunks of 5000 (0.23 s vs 0.35 s at 250).
CPU_CHUNK_BYTES = 4 * 2**20
# On a GPU, all activations one chunk saves are kept under this size. Small launch-bound nets still get the
# whole set (MNIST-FC saves 1.2 kB per example: 55,000 in one chunk, 0.9 ms per pass on an H200 against
# 3.7 ms in chunks of 11,000), while a chunk of a conv net is large enough to fill the GPU long before
# this: LeNet (158 kB per example) on 55,000 MNIST images in one chunk peaked at 41 GB on an H200, more
# than most cards have; under this bound it takes chunks of 6,792 (the peak scales with the chunk: ≈ 5 GB).
GPU_CHUNK_BYTES = 2**30


def saved_activation_bytes(model: nn.Module, x: torch.Tensor | tuple | dict) -> tuple[int, int]:
    """Bytes per example that autograd saves in a forward pass of ``model`` on ``x`` (a few examples
    [B, ...]; a tensor, tuple or dict of tensors), in L's mode: ``(total, largest single tensor)``,
    parameters and views of ``x`` not counted."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned.update(t.untyped_storage().data_ptr() for t in tree_leaves(x))
    total = biggest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total, biggest
        if t.untyped_storage().data_ptr() not in owned:
            total += t.numel() * t.element_size()
            biggest = max(biggest, t.numel() * t.element_size())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.enable_grad(), lca_eval_mode(model), hooks:
        call(model, x)
    n = tree_len(x)
    return -(-total // n), -(-biggest // n)


def auto_chunk_size(
    model: nn.Module,
    n_examples: int,
    device: torch.device | str,
    x: torch.Tensor | tuple | dict | None = None,
) -> int:
    """The chunk size ``lca.chunk_size=auto`` resolves to.

    With BatchNorm the chunk is part of the definition of L: always 5000 (the paper-scale default).
    Without BatchNorm L does not depend on the chunking, so it is a pure speed choice: on a GPU small
    nets are bound by kernel launches, and the whole set in one chunk is several times faster
    (MNIST-FC on an H200: 0.96 ms per full pass in one chunk of 55k vs 3.7 ms in chunks of 11k), so,
    given the data ``x`` [N, ...], the largest chunk (≤ 65,536, ≥ 64) whose saved activations stay under
    ``GPU_CHUNK_BYTES`` (see there; without ``x``: the whole set up to 65,536); on the CPU the largest
    chunk (≤ 5000, ≥ 64) whose largest activation stays under ``CPU_CHUNK_BYTES`` (without ``x``: 5000).
    """
    n = int(n_examples)
    if has_batchnorm(model):
        return min(5000, n)
    if torch.device(device).type == "cuda":
        if x is None or n == 0:
            return min(n, 65536)
        total = max(1, saved_activation_bytes(model, tree_map(lambda t: t[:4], x))[0])
        return min(n, 65536, max(64, GPU_CHUNK_BYTES // total))
    if x is None or n == 0:
        return min(5000, n)
    per_example = max(1, saved_activation_bytes(model, tree_map(lambda t: t[:4], x))[1])
    return min(n, 5000, max(64, CPU_CHUNK_BYTES // per_example))


class FullBatchLoss:
    """``L(θ)`` and ``∇L(θ)`` over a fixed data set, for θ given as one flat vector.

    Args:
        model: the network; its own parameters are not modified (θ is passed functionally).
        x: inputs [N, ...] on the model's device (a tensor, or a tuple or dict of tensors: the model is
            called as ``model(*x)`` / ``model(**x)``), or the split as :mod:`lca_lab.examples` examples
            (cached or streamed), with ``y`` None.
        y: targets [N, ...] (class indices; one per example or one per token; -100 not counted).
        chunk_size: examples per forward pass; part of the definition of L for BatchNorm nets.
        loss_fn: ``loss_fn(logits [M, C], y [M], reduction="sum")`` → scalar; default cross-entropy
            (nats). L is its sum over the split's counted targets divided by their number.
        param_names: which named parameters θ covers (default: all with ``requires_grad``), in
            ``named_parameters()`` order. Parameters not covered are held at their current value.
        n_classes: needed for per-class LCA (``class_loss_and_grad``).
        channels_last: evaluate conv nets in the channels-last memory format (inputs [N, C, H, W] and
            4-d weights are laid out NHWC; shapes and values are unchanged). Faster with cuDNN on
            tensor-core GPUs; the numbers differ from NCHW only by float rounding.
        cuda_graph: on a CUDA device, record one whole ``loss_and_grad`` pass (every chunk, forward and
            backward) as a CUDA graph on first use and replay it afterwards: one launch per pass instead
            of dozens per chunk, for small nets whose passes are bound by kernel launches. Same kernels,
            same numbers. The graph holds one pass's activations in a private memory pool; it is
            recorded again when the TF32 flags change. If recording fails (an op in the net or loss
            that cannot be captured), a warning says why (``graph_error``) and the eager path is used.
            Ignored on the CPU.
        cudnn_benchmark: run the passes of L with ``torch.backends.cudnn.benchmark`` on (restored after
            each pass): cuDNN times its convolution algorithms once per shape and keeps the fastest.
            Every pass repeats the same chunk shapes, so the timing is paid once. The chosen algorithms
            may differ from run to run, so the numbers agree between runs only to float rounding.
            PyTorch keeps the plan the first pass of a convolution shape found for the rest of the
            process, whatever the flag says later: a shape run first without the autotuner keeps its
            heuristic algorithm (and one run first with it keeps the timed one for other callers).
            No effect without cuDNN (CPU, nets without convolutions).
        compile: run each chunk's forward and loss (and so its backward) through ``torch.compile``
            (TorchInductor, static shapes): elementwise layers such as BatchNorm and ReLU are fused into
            fewer kernels, which reads activations fewer times. The first pass compiles (tens of seconds
            to minutes); a chunk of a new size compiles again. Same function, other kernels: the numbers
            agree with the eager pass to float rounding. If compiling fails, a warning says why
            (``compile_error``) and the eager path is used.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor | tuple | dict | Examples,
        y: torch.Tensor | None,
        chunk_size: int,
        loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
        param_names: list[str] | None = None,
        n_classes: int | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        cudnn_benchmark: bool = False,
        compile: bool = False,
        shard: Shard | None = None,
    ):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        examples = x if isinstance(x, (CachedExamples, StreamedExamples)) else CachedExamples(x, y)
        if len(examples) == 0:
            raise ValueError("FullBatchLoss needs at least one example")
        self.model = model
        cached = not examples.streamed
        self.channels_last = (
            bool(channels_last) and cached and isinstance(examples.inputs, torch.Tensor)
            and examples.inputs.dim() == 4
        )  # fmt: skip
        if self.channels_last:
            examples = CachedExamples(
                examples.inputs.contiguous(memory_format=torch.channels_last), examples.targets
            )
        self.examples = examples
        self.n_counted = examples.n_counted  # L's denominator: the split's counted targets
        if self.n_counted == 0:
            raise ValueError("FullBatchLoss: every target of the split is -100 (ignored); nothing to count")
        self.mask_ignored = examples.has_ignored and getattr(loss_fn, "ignore_index", None) != -100
        self.chunk_size = int(chunk_size)
        self.loss_fn = loss_fn
        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in param_names if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; valid: {list(named)}")
        self.param_names = list(param_names)
        self._aliases = tied_aliases(model, self.param_names)
        self.shapes = [tuple(named[n].shape) for n in self.param_names]
        self.numels = [named[n].numel() for n in self.param_names]
        self.n_params = sum(self.numels)
        self.dtype = named[self.param_names[0]].dtype
        self.device = named[self.param_names[0]].device
        self.n_evals = 0  # full passes made (for efficiency accounting)
        self.n_classes = n_classes
        self.has_bn = has_batchnorm(model)
        self._mode_modules = mode_modules(model)
        # this process's share of the passes (lca_lab.dist): its chunks, summed over ranks by all-reduce
        self.shard = shard or SINGLE
        self._ranges = self.shard.ranges(len(examples), self.chunk_size, self.has_bn)
        # A graph replays fixed addresses: only for data cached on the device, and one process.
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda" and cached and not self.shard.active
        self.graph_error: str | None = None
        self._graph: tuple | None = None  # (flags, graph, static θ, static L, static ∇L)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.compile = bool(compile)
        self.compile_error: str | None = None
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._compile_ok = False  # one compiled pass has run
        self._segments: list[tuple[int, int, int]] | None = None
        if n_classes is not None and cached and (examples.targets.dim() != 1 or examples.has_ignored):
            raise ValueError("per-class LCA needs one class index per example (targets [N], none -100)")
        if n_classes is not None:
            if self.has_bn or not cached or self.shard.active:
                # BN couples the examples of a chunk: keep the chunks that define L, and take one backward
                # pass per class present in the chunk (≈ n_classes backward passes per full pass). Streamed
                # data is read in its own order: the same per-chunk classes.
                self._segments = None
            else:
                # Without BN, L does not depend on how the data is chunked: sort by class once so every
                # chunk holds one class and the per-class gradients cost one ordinary full pass.
                order = torch.sort(examples.targets, stable=True).indices
                self.examples = examples = CachedExamples(
                    tree_map(lambda t: t[order], examples.inputs), examples.targets[order]
                )
                counts = torch.bincount(examples.targets, minlength=n_classes).tolist()
                self._segments, start = [], 0
                for c, n in enumerate(counts):
                    for s0 in range(start, start + n, self.chunk_size):
                        self._segments.append((s0, min(s0 + self.chunk_size, start + n), c))
                    start += n

    @property
    def x(self):
        """The cached split's inputs (a tensor, tuple or dict of tensors [N, ...]; None when streamed)."""
        return None if self.examples.streamed else self.examples.inputs

    @property
    def y(self) -> torch.Tensor | None:
        """The cached split's targets [N, ...] (None when streamed)."""
        return None if self.examples.streamed else self.examples.targets

    def flat_params(self) -> torch.Tensor:
        """Current parameters of the model as one detached flat vector [K]."""
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.param_names])

    def unflatten(self, theta: torch.Tensor, layout: bool = True) -> dict[str, torch.Tensor]:
        """Flat [K] → {name: view of shape}, tied parameters under each of their names (4-d weights
        copied to channels-last when that is on and ``layout``; vmap cannot change memory formats, and
        cuDNN follows the input's layout anyway)."""
        out = {n: t.view(s) for n, t, s in zip(self.param_names, theta.split(self.numels), self.shapes)}
        if self.channels_last and layout:
            cl = torch.channels_last
            out = {n: t.contiguous(memory_format=cl) if t.dim() == 4 else t for n, t in out.items()}
        for alias, name in self._aliases:
            out[alias] = out[name]
        return out

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The model on ``x`` with ``params`` (from :meth:`unflatten`, which lists tied parameters under
        every name, so functional_call need not search the module tree for ties on every call)."""
        args, kwargs = args_kwargs(x)
        return functional_call(self.model, params, args, kwargs, strict=False, tie_weights=False)

    def _chunks(self):
        """This process's chunks (all of them in one process)."""
        if not self.shard.active:
            return self.examples.chunks(self.chunk_size)
        if not self._ranges:
            return iter(())  # more ranks than chunks: this one adds zeros
        return self.examples.chunks(self.chunk_size, self._ranges[0][0], self._ranges[-1][1])

    def _summed(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Float64 local sums → the sums over every rank: one all-reduce of their concatenation."""
        if not self.shard.active:
            return list(parts)
        flat = self.shard.all_reduce_(torch.cat([p.reshape(-1) for p in parts]))
        return [v.view_as(p) for p, v in zip(parts, flat.split([p.numel() for p in parts]))]

    def _target_loss(self, out, y: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """One chunk's loss over its counted targets (:func:`~lca_lab.examples.target_loss`)."""
        return target_loss(self.loss_fn, out, y, reduction, self.mask_ignored)

    def _flags(self):
        """The cuDNN setting of this loss's passes (``cudnn_benchmark``), or nothing to change."""
        return cudnn_benchmark(True) if self.cudnn_benchmark else contextlib.nullcontext()

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """``L(θ)`` as a float64 0-d tensor (mean loss per counted target)."""
        with torch.no_grad(), lca_eval_mode(self.model, self._mode_modules), self._flags():
            params = self.unflatten(theta)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for xb, yb in self._chunks():
                total += self._target_loss(self._forward(params, xb), yb).double()
        (total,) = self._summed(total)
        return total / self.n_counted

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(θ), ∇L(θ))``: float64 0-d tensor and float64 flat gradient [K]."""
        self.n_evals += 1
        with self._flags():
            if self.cuda_graph:
                out = self._replay(theta)
                if out is not None:
                    return out
            return self._loss_and_grad(theta)

    def _replay(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``loss_and_grad`` through the recorded CUDA graph (recording it first); None if it cannot be."""
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, theta.dtype)
        if self._graph is None or self._graph[0] != flags:
            self._graph = None
            try:
                self._graph = (flags, *self._record(theta))
            except Exception as e:  # recording is an optimisation: fall back to the eager passes
                self.cuda_graph = False
                self.graph_error = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"lca.cuda_graph: recording the full-data pass as a CUDA graph failed "
                    f"({self.graph_error}); continuing without it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
        _, graph, static_theta, static_L, static_g = self._graph
        static_theta.copy_(theta)
        graph.replay()
        # The graph's outputs are overwritten by the next replay; callers keep them across passes.
        return static_L.clone(), static_g.clone()

    def _record(self, theta: torch.Tensor) -> tuple:
        """Record one ``_loss_and_grad`` pass → (graph, static θ [K], static L, static ∇L [K])."""
        static_theta = theta.detach().clone()
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                # Warm-up on a side stream, as capture requires: cuBLAS/cuDNN handles, workspaces and
                # the autograd engine's device threads exist before recording starts.
                for _ in range(2):
                    self._loss_and_grad(static_theta)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the run-file writer's thread may use CUDA (events) while this one records.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_L, static_g = self._loss_and_grad(static_theta)
        return graph, static_theta, static_L, static_g

    def _chunk_loss(self, params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor):
        """Summed loss of one chunk (the function ``compile`` hands to ``torch.compile``)."""
        return self._target_loss(self._forward(params, xb), yb)

    def _loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._chunk_loss, dynamic=False)
            if self._compile_ok:
                return self._passes(theta, self._compiled)
            try:
                out = self._passes(theta, self._compiled)
            except Exception as e:  # compiling is an optimisation: fall back to the eager passes
                self.compile, self._compiled = False, None
                self.compile_error = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"lca.compile: compiling the full-data pass failed ({self.compile_error}); "
                    "continuing without it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                self._compile_ok = True
                return out
        return self._passes(theta, self._chunk_loss)

    def _passes(
        self, theta: torch.Tensor, chunk_loss: Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Few, in-place float64 ops: on a GPU small nets are bound by kernel launches, so every op
        # of the per-pass bookkeeping costs about as much as a layer.
        grad = None
        sums = []
        with torch.enable_grad(), lca_eval_mode(self.model, self._mode_modules):
            leaf = theta.detach().requires_grad_(True)  # a new alias: θ itself is left untouched
            params = self.unflatten(leaf)
            for xb, yb in self._chunks():
                loss_sum = chunk_loss(params, xb, yb)
                (g,) = torch.autograd.grad(loss_sum, leaf)
                grad = g.double() if grad is None else grad.add_(g)
                sums.append(loss_sum.detach())
        n = self.n_counted
        if not sums:  # a rank without a chunk
            grad = torch.zeros(self.n_params, dtype=torch.float64, device=self.device)
            sums = [torch.zeros((), dtype=torch.float64, device=self.device)]
        total = sums[0].double() if len(sums) == 1 else torch.stack(sums).double().sum()
        if self.shard.active:
            grad, total = self._summed(grad, total)
        return total.div_(n), grad.div_(n)

    def loss_and_grad_batch(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``L`` and ``∇L`` at B points at once with ``torch.func.vmap``: float64 ``[B]`` and ``[B, K]``.

        Small nets are bound by kernel launches, not arithmetic: one batched pass over B points costs
        far less than B passes. Memory grows with B × activations; callers choose B. Counts B passes.
        """

        def chunk_loss(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return self._target_loss(self._forward(self.unflatten(theta, layout=False), xb), yb)

        vg = vmap(grad_and_value(chunk_loss), in_dims=(0, None, None))
        grad = torch.zeros(thetas.shape[0], self.n_params, dtype=torch.float64, device=self.device)
        total = torch.zeros(thetas.shape[0], dtype=torch.float64, device=self.device)
        with torch.enable_grad(), lca_eval_mode(self.model, self._mode_modules), self._flags():
            for xb, yb in self._chunks():
                g, loss_sum = vg(thetas.detach(), xb, yb)
                grad += g.double()
                total += loss_sum.double()
        grad, total = self._summed(grad, total)
        n = self.n_counted
        self.n_evals += len(thetas)
        return total / n, grad / n

    def class_loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class parts of L and ∇L: ``L_c = (1/N) Σ_{i in class c} ℓ_i`` so that Σ_c L_c = L.

        Returns float64 ``loss [C]`` and ``grad [C, K]``. Needs ``n_classes`` at construction and a loss
        that accepts ``reduction="none"`` for BatchNorm nets.
        """
        if self.n_classes is None:
            raise ValueError("FullBatchLoss was built without n_classes; pass n_classes=C for per-class LCA")
        self.n_evals += 1
        C = self.n_classes
        grad = torch.zeros(C, self.n_params, dtype=torch.float64, device=self.device)
        loss = torch.zeros(C, dtype=torch.float64, device=self.device)
        with torch.enable_grad(), lca_eval_mode(self.model, self._mode_modules), self._flags():
            leaf = theta.detach().clone().requires_grad_(True)
            params = self.unflatten(leaf)
            if self._segments is not None:
                ex = self.examples
                for s0, s1, c in self._segments:
                    out = self._forward(params, tree_map(lambda t, s0=s0, s1=s1: t[s0:s1], ex.inputs))
                    loss_sum = self._target_loss(out, ex.targets[s0:s1])
                    (g,) = torch.autograd.grad(loss_sum, leaf)
                    grad[c] += g.double()
                    loss[c] += loss_sum.detach().double()
            else:
                for xb, yb in self._chunks():
                    out = self._forward(params, xb)
                    per_example = self._target_loss(out, yb, reduction="none")
                    # one host sync per chunk (BN or streamed data only)
                    present = [c for c in torch.unique(yb).tolist() if c != IGNORE]
                    for j, c in enumerate(present):
                        part = per_example[yb == c].sum()
                        (g,) = torch.autograd.grad(part, leaf, retain_graph=j < len(present) - 1)
                        grad[c] += g.double()
                        loss[c] += part.detach().double()
        grad, loss = self._summed(grad, loss)
        n = self.n_counted
        return loss / n, grad / n


@dataclass
class StepLCA:
    """LCA of one training step θ_t → θ_{t+1}.

    Attributes:
        param: per-parameter LCA [K], float64, nats (negative = helping).
        total: Σ param, float64 0-d tensor.
        loss0, loss1: L(θ_t), L(θ_{t+1}), float64 0-d tensors.
        error: total − (loss1 − loss0), float64 0-d tensor.
        splits: Simpson sub-intervals used (1 for first order).
        converged: |error| ≤ tolerance, for every method (first order does not refine, but is flagged).
        passes: full-data gradient passes made for this step (the reused endpoint not counted).
        class_param: [C, K] float64 per-class LCA (Σ_c = param) when the engine is per-class, else None.
        class_loss0, class_loss1: [C] per-class parts of L at both ends, else None.
        test_param: [K] float64 LCA of the same motion scored on the held-out loss, else None.
        test_loss0, test_loss1, test_error: held-out loss at both ends and Σ test_param − ΔL_test.
        layer: [n_layers] float64 per-layer LCA (Σ of ``param`` over each layer's entries) when the engine
            has ``layer_sums``, else None; ``total`` is then that product's whole-row column.
    """

    param: torch.Tensor
    total: torch.Tensor
    loss0: torch.Tensor
    loss1: torch.Tensor
    error: torch.Tensor
    splits: int
    converged: bool
    passes: int
    class_param: torch.Tensor | None = None
    class_loss0: torch.Tensor | None = None
    class_loss1: torch.Tensor | None = None
    test_param: torch.Tensor | None = None
    test_loss0: torch.Tensor | None = None
    test_loss1: torch.Tensor | None = None
    test_error: torch.Tensor | None = None
    grad0: torch.Tensor | None = None  # [K] float64 ∇L(θ_t), for gradient-sign statistics
    delta: torch.Tensor | None = None  # [K] float64 θ_{t+1} − θ_t
    layer: torch.Tensor | None = None
    # ``error`` and ``loss1`` as Python floats, read by the step itself (for its refinement decision), so a
    # caller needs no host sync of its own; None for steps of :meth:`LCAEngine.steps` in batched blocks.
    host_error: float | None = None
    host_loss1: float | None = None
    # Subset estimates (lca.estimate=subset, lca_lab.estimate): standard errors of ``total`` (0-d) and of
    # ``layer`` [n_layers] from the sampling, the subset's seed and its examples; None on the exact path.
    total_se: torch.Tensor | None = None
    layer_se: torch.Tensor | None = None
    subset_seed: int | None = None
    subset_examples: int | None = None
    # overlapping halves (BN nets' fresh draws): covariance [n_layers + 1] with the previous row's estimate
    cov_prev: torch.Tensor | None = None


class _HostPair:
    """Two float64 device scalars [2] on their way to the host: a non-blocking copy into pinned memory and
    an event on CUDA (``read`` waits for that event only, not for work queued after it); on the CPU the
    values are read at once."""

    def __init__(self, pair: torch.Tensor):
        if pair.device.type == "cuda":
            self._buf = torch.empty(pair.shape, dtype=pair.dtype, pin_memory=True)
            self._buf.copy_(pair, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._vals = None
        else:
            self._vals = pair.tolist()

    def read(self) -> list[float]:
        if self._vals is None:
            self._event.synchronize()
            self._vals = self._buf.tolist()
        return self._vals


class PendingStep:
    """A step launched by :meth:`LCAEngine.launch`; ``result()`` finishes it (once) → :class:`StepLCA`.

    Later calls return the same step, or raise the same error if finishing it failed (e.g. out of memory
    in a refinement pass)."""

    def __init__(self, gen: Generator[None, None, StepLCA]):
        self._gen: Generator[None, None, StepLCA] | None = gen
        self._result: StepLCA | None = None
        self._error: BaseException | None = None

    def result(self) -> StepLCA:
        if self._gen is not None:
            gen, self._gen = self._gen, None
            try:
                next(gen)
            except StopIteration as stop:
                self._result = stop.value
            except BaseException as e:
                self._error = e
                raise
            else:  # the generator yields exactly once
                raise RuntimeError("LCAEngine step generator yielded twice")
        if self._error is not None:
            raise self._error
        return self._result


class LCAEngine:
    """Path-integral LCA along a training trajectory, one step at a time.

    Usage::

        engine = LCAEngine(FullBatchLoss(model, x, y, chunk_size=5000))
        theta0 = engine.loss.flat_params()
        ... optimizer step ...
        step = engine.step(theta0, engine.loss.flat_params())

    ``g(θ_{t+1})`` computed for one step is reused as ``g(θ_t)`` of the next when the next call's
    θ_t is the previous call's θ_{t+1} (the same tensor: no comparison, no host sync) or has the same
    values. The engine keeps a reference to θ_{t+1}: do not modify it in place.

    Args:
        loss: the ``FullBatchLoss`` defining L.
        method: ``"rk4"`` (Simpson, adaptive) or ``"first_order"``.
        tolerance: refine while |Σ A − ΔL| exceeds this (nats). Must be > 0.
        max_splits: most Simpson sub-intervals (a power of two ≥ 2).
        adaptive: if False, RK4 always uses 2 splits.
        per_class: also split the LCA by class (``loss`` needs ``n_classes``); refinement is decided on
            the total, so the per-class parts use the same quadrature points.
        test_loss: a ``FullBatchLoss`` on held-out data: the same motion, scored against it, at the same
            quadrature points (its residual is recorded, not refined on).
        layer_sums: a :class:`LayerSums` over the flat parameter vector: each step then carries its
            per-layer LCA (``StepLCA.layer``), taken with the total in one product
            (:meth:`LayerSums.with_total`) where the sum alone was one kernel. A caller that needs the
            per-layer sums of every step (the training loop) saves a launch per step: what a small net's
            host-bound loop pays for.
    """

    def __init__(
        self,
        loss: FullBatchLoss,
        method: str = "rk4",
        tolerance: float = 1e-3,
        max_splits: int = 32,
        adaptive: bool = True,
        per_class: bool = False,
        test_loss: FullBatchLoss | None = None,
        layer_sums: LayerSums | None = None,
    ):
        check_engine_options(method, tolerance, max_splits)
        if layer_sums is not None and layer_sums.K != loss.n_params:
            raise ValueError(
                f"layer_sums covers {layer_sums.K} entries but the loss has {loss.n_params} entries: "
                "build it from the same model's trainable parameters (lca_lab.nets.entry_layer_index)"
            )
        if per_class and loss.n_classes is None:
            raise ValueError("per_class=True needs FullBatchLoss(..., n_classes=C)")
        self.loss = loss
        self.method = method
        self.tolerance = float(tolerance)
        self.max_splits = int(max_splits)
        self.adaptive = adaptive
        self.per_class = per_class
        self.test_loss = test_loss
        self.layer_sums = layer_sums
        self._cache: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._max_points: int | None = None  # largest batch of path points that fit (after an OOM)

    def reset(self) -> None:
        """Forget the cached endpoint gradient (e.g. after parameters were changed by hand)."""
        self._cache = None

    def _eval(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """All losses and gradients the engine needs at one point of the path."""
        out: dict[str, torch.Tensor] = {}
        if self.per_class:
            out["Lc"], out["gc"] = self.loss.class_loss_and_grad(theta)
            out["L"], out["g"] = out["Lc"].sum(), out["gc"].sum(0)
        else:
            out["L"], out["g"] = self.loss.loss_and_grad(theta)
        if self.test_loss is not None:
            out["Lt"], out["gt"] = self.test_loss.loss_and_grad(theta)
        return out

    @property
    def cached_point(self) -> dict[str, torch.Tensor]:
        """Losses and gradients at the last endpoint (keys L, g; Lc, gc when per-class; Lt, gt with test)."""
        if self._cache is None:
            raise RuntimeError("no endpoint computed yet: call prime() or step() first")
        return self._cache[1]

    def prime(self, theta: torch.Tensor) -> torch.Tensor:
        """Compute and cache L and ∇L at the first point of a trajectory; return L (float64 0-d)."""
        point, _ = self._endpoint(theta)
        self._cache = (theta, point)
        return point["L"]

    def _endpoint(self, theta: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        if self._cache is not None and (self._cache[0] is theta or torch.equal(self._cache[0], theta)):
            return self._cache[1], 0
        return self._eval(theta), 1

    def step(self, theta0: torch.Tensor, theta1: torch.Tensor) -> StepLCA:
        """LCA of the straight segment θ0 → θ1 (flat [K] tensors in the parameters' dtype)."""
        return self.launch(theta0, theta1).result()

    def launch(self, theta0: torch.Tensor, theta1: torch.Tensor) -> PendingStep:
        """Start the LCA of θ0 → θ1 without waiting for the GPU; ``.result()`` finishes it.

        Launches the passes at θ1 and at the first quadrature points, the allocation and a non-blocking
        copy of its error to the host, then returns. ``result()`` reads the error (the one host sync the
        adaptive decision needs), refines if it must, and returns the :class:`StepLCA`: the numbers are
        those of :meth:`step`. Between the two the host is free, e.g. to launch the next training step,
        so that its work overlaps the GPU's passes instead of waiting for them. The endpoint cache is
        updated at launch, so the next step may be launched before this one's ``result()``. θ0 and θ1
        must stay unmodified until then (a refinement reads them); flat copies such as
        ``FullBatchLoss.flat_params()`` are, whatever the optimizer does to the model in between.
        """
        gen = self._step_gen(theta0, theta1)
        next(gen)  # runs up to the first host read
        return PendingStep(gen)

    def _step_gen(self, theta0: torch.Tensor, theta1: torch.Tensor) -> Generator[None, None, StepLCA]:
        """:meth:`step` as a generator: yields once, before its first host read; returns the StepLCA."""
        p0, passes = self._endpoint(theta0)
        p1 = self._eval(theta1)
        self._cache = (theta1, p1)
        passes += 1
        delta = theta1.double() - theta0  # not in place: .double() of a float64 θ is θ itself
        dloss = p1["L"] - p0["L"]
        # Gradients to integrate; with per-class, "g" is the sum of "gc" and need not be integrated twice.
        gkey = "gc" if self.per_class else "g"
        grads = [gkey] + (["gt"] if self.test_loss is not None else [])
        class_param = None  # [C, K] per-class LCA, kept from the last allocation when per-class

        layer = None  # [n_layers] per-layer LCA of the last allocation, with layer_sums

        def allocate(
            gbar: dict[str, torch.Tensor],
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _HostPair]:
            """Per-parameter LCA, its sum, its error, and the error with L(θ_{t+1}) on their way to the host
            (the adaptive decision reads them; L rides along so that callers need no second read)."""
            nonlocal class_param, layer
            param = gbar[gkey] * delta
            if self.per_class:
                class_param = param
                param = param.sum(0)
            if self.layer_sums is not None:
                layer, total = self.layer_sums.with_total(param)
            else:
                total = param.sum()
            e = total - dloss
            return param, total, e, _HostPair(torch.stack([e, p1["L"]]))

        splits = 1
        if self.method == "first_order":
            gbar = {k: p0[k] for k in grads}
            param, total, err_t, host = allocate(gbar)
            yield
            err, host_loss1 = host.read()
        else:
            # Composite Simpson on 2^j sub-intervals: ḡ = (ends + 2·older + 4·newest) / (3·splits), where
            # "newest" sums the gradients at the points added by the last doubling (odd grid points) and
            # "older" all interior points before it; doubling reuses every gradient already computed.
            ends = {k: p0[k] + p1[k] for k in grads}
            done = False
            first = True
            if self.method == "trapezoid":
                gbar = {k: ends[k].mul(0.5) for k in grads}
                param, total, err_t, host = allocate(gbar)
                yield
                first = False
                err, host_loss1 = host.read()
                done = not math.isfinite(err) or not self.adaptive or abs(err) <= self.tolerance
            if not done:
                older: dict[str, torch.Tensor] | None = None
                newest: dict[str, torch.Tensor] | None = None
                while True:
                    if newest is not None:
                        older = newest if older is None else {k: older[k].add_(newest[k]) for k in grads}
                    newest = None
                    splits *= 2
                    for k_pt in range(1, splits, 2):
                        pt = self._eval(_point(theta0, delta, k_pt / splits))
                        newest = (
                            {k: pt[k] for k in grads}
                            if newest is None
                            else {k: newest[k].add_(pt[k]) for k in grads}
                        )
                        passes += 1
                    if older is None:
                        gbar = {k: ends[k].add(newest[k], alpha=4.0).div_(3.0 * splits) for k in grads}
                    else:
                        gbar = {
                            k: ends[k].add(older[k], alpha=2.0).add_(newest[k], alpha=4.0).div_(3.0 * splits)
                            for k in grads
                        }
                    param, total, err_t, host = allocate(gbar)
                    if first:
                        yield
                        first = False
                    err, host_loss1 = host.read()
                    if not math.isfinite(err):  # a diverged step: refining cannot help, let the caller stop
                        break
                    if not self.adaptive or abs(err) <= self.tolerance or splits >= self.max_splits:
                        break
        # First order never refines and fixed Simpson stops at one split, but a row over the tolerance is
        # flagged whatever the method: ``converged`` is what a reader of the run file filters on.
        converged = abs(err) <= self.tolerance
        st = StepLCA(
            param, total, p0["L"], p1["L"], err_t, splits, converged, passes, grad0=p0["g"], delta=delta
        )
        st.host_error, st.host_loss1, st.layer = err, host_loss1, layer
        if class_param is not None:
            st.class_param, st.class_loss0, st.class_loss1 = class_param, p0["Lc"], p1["Lc"]
        if "gt" in gbar:
            st.test_param = gbar["gt"] * delta
            st.test_loss0, st.test_loss1 = p0["Lt"], p1["Lt"]
            st.test_error = st.test_param.sum() - (p1["Lt"] - p0["Lt"])
        return st

    def steps(
        self, thetas: Sequence[torch.Tensor] | torch.Tensor, batch_points: int = 64
    ) -> Iterator[StepLCA]:
        """LCA of every step of a known trajectory θ_0 … θ_n (n steps), evaluating many points together.

        For recomputing LCA from a stored trajectory: every endpoint is known in advance, so the
        gradients of up to ``batch_points`` points are computed in one ``vmap``-batched pass, and the
        points a refinement needs (midpoints, quarter points …) of all steps of a block are batched
        likewise. The decisions and the results are those of calling :meth:`step` on each pair (up
        to float rounding of the batched kernels); per-class and test LCA use :meth:`step`.

        Args:
            thetas: [n+1, K] tensor or a sequence of n+1 flat [K] tensors, in the parameters' dtype,
                on the loss's device (a sequence may be lazy, e.g. rows read from a run file).
            batch_points: points per batched pass (memory ≈ batch_points × one pass's activations);
                1 evaluates point by point (large nets, where batching gains nothing).

        Yields:
            one :class:`StepLCA` per step, in order. The engine's endpoint cache then holds θ_n.
        """
        if self.per_class or self.test_loss is not None or batch_points <= 1:
            prev = None
            for th in thetas:
                if prev is not None:
                    yield self.step(prev, th)
                prev = th
            return
        B = int(batch_points)
        it = iter(thetas)
        try:
            first = next(it)
        except StopIteration:
            return
        block = [first]
        for th in it:
            block.append(th)
            if len(block) == B + 1:
                yield from self._block_steps(block)
                block = [block[-1]]
        if len(block) > 1:
            yield from self._block_steps(block)

    def _eval_many(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L [P] and ∇L [P, K] (float64) at P points ``[P, K]``, in batched passes.

        A batch that does not fit in GPU memory (B × one pass's activations) is halved, and the engine
        remembers the size that fits, so a too-large ``batch_points`` costs time once, not the run.
        """
        Ls, Gs, i = [], [], 0
        while i < len(points):
            n = min(self._max_points or len(points), len(points) - i)
            try:
                L, G = self.loss.loss_and_grad_batch(points[i : i + n])
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                self._max_points = n // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            Ls.append(L)
            Gs.append(G)
            i += n
        return torch.cat(Ls), torch.cat(Gs)

    def _block_steps(self, block: list[torch.Tensor]) -> Iterator[StepLCA]:
        """The steps of one block θ_0 … θ_m with batched evaluation (see :meth:`steps`)."""
        m = len(block) - 1
        theta = torch.stack([b.to(self.loss.dtype) for b in block])  # [m+1, K]
        cached = self._cache is not None and (
            self._cache[0] is block[0] or torch.equal(self._cache[0], block[0])
        )
        start = 1 if cached else 0
        L, G = self._eval_many(theta[start:])
        passes0 = [0] * m
        if cached:
            L = torch.cat([self._cache[1]["L"].reshape(1), L])
            G = torch.cat([self._cache[1]["g"].unsqueeze(0), G])
        else:
            passes0[0] = 1
        delta = theta[1:].double() - theta[:-1].double()  # [m, K]
        dloss = L[1:] - L[:-1]  # [m]
        ends = G[:-1] + G[1:]  # [m, K]
        passes = [p + 1 for p in passes0]
        splits = [1] * m
        if self.method == "first_order":
            gbar = G[:-1].clone()
            err = (gbar * delta).sum(1) - dloss
            errs = err.tolist()
            err_decided = None
        else:
            gbar = 0.5 * ends
            err_decided = (gbar * delta).sum(1) - dloss
            errs = err_decided.tolist()  # one host sync per block
            if self.method == "trapezoid" and self.adaptive:
                todo = [i for i in range(m) if math.isfinite(errs[i]) and abs(errs[i]) > self.tolerance]
            elif self.method == "trapezoid":
                todo = []
            else:
                todo = list(range(m))
            even = torch.zeros_like(ends)
            odd = torch.zeros_like(ends)
            while todo:
                idx = torch.tensor(todo, device=ends.device)
                even[idx] = even[idx] + odd[idx]
                odd[idx] = 0.0
                for i in todo:
                    splits[i] *= 2
                owner, frac = [], []
                for i in todo:
                    for k_pt in range(1, splits[i], 2):
                        owner.append(i)
                        frac.append(k_pt / splits[i])
                        passes[i] += 1
                own = torch.tensor(owner, device=ends.device)
                fr = torch.tensor(frac, dtype=torch.float64, device=ends.device)
                # All new points at once: θ_i + f·Δ_i in float64, then cast (as _point does one at a time).
                pts = torch.addcmul(theta[own].double(), fr[:, None], delta[own]).to(theta.dtype)
                for s0 in range(0, len(pts), m):
                    _, g = self._eval_many(pts[s0 : s0 + m])
                    odd.index_add_(0, own[s0 : s0 + m], g)
                sp = torch.tensor([splits[i] for i in todo], dtype=torch.float64, device=ends.device)
                gbar[idx] = (ends[idx] + 4.0 * odd[idx] + 2.0 * even[idx]) / (3.0 * sp[:, None])
                e = (gbar[idx] * delta[idx]).sum(1) - dloss[idx]
                err_decided[idx] = e
                new = e.tolist()
                nxt = []
                for i, v in zip(todo, new):
                    errs[i] = v
                    refine = math.isfinite(v) and self.adaptive and abs(v) > self.tolerance
                    if refine and splits[i] < self.max_splits:
                        nxt.append(i)
                todo = nxt
        conv = [abs(v) <= self.tolerance for v in errs]  # flagged for every method, as in step()
        param = gbar * delta  # [m, K]
        self._cache = (block[-1], {"L": L[-1], "g": G[-1]})
        if self.layer_sums is not None:  # the whole block's per-layer sums and totals in one product
            layer, totals = self.layer_sums.with_total(param)
        else:
            layer, totals = None, param.sum(1)
        for i in range(m):
            error = totals[i] - dloss[i] if err_decided is None else err_decided[i]
            yield StepLCA(
                param[i], totals[i], L[i], L[i + 1], error, splits[i], conv[i], passes[i],
                grad0=G[i], delta=delta[i], layer=None if layer is None else layer[i],
            )  # fmt: skip


def _point(theta0: torch.Tensor, delta: torch.Tensor, frac: float) -> torch.Tensor:
    """θ0 + frac·Δ for a float64 step Δ [K], computed in float64 and cast back to θ0's dtype."""
    return torch.add(theta0, delta, alpha=frac).to(theta0.dtype)


def check_engine_options(method: str, tolerance: float, max_splits: int) -> None:
    """Raise ``ValueError`` naming the fix for an invalid engine setting."""
    if method not in METHODS:
        raise ValueError(f"lca.method={method!r} is not one of {list(METHODS)}")
    if not tolerance > 0:
        raise ValueError(f"lca.tolerance must be > 0 (nats per iteration), got {tolerance}")
    ms = int(max_splits)
    if ms < 2 or ms & (ms - 1):
        raise ValueError(f"lca.max_splits must be a power of two ≥ 2 (e.g. 32), got {max_splits}")


class LayerSums:
    """Per-layer sums of per-parameter vectors: ``x`` [..., K] → [..., n_layers] float64.

    Args:
        index: [K] int64, the layer of every entry of the flat parameter vector (on the run's device;
            read to the host once, here).
        n_layers: number of layers.
        dense: allow the ``"dense"`` way: None (default) on a CUDA device only, True on any device (where
            the index is small enough), False never.

    Three ways, chosen once here from the index's size (``strategy``):

    * ``"dense"`` (on CUDA, K × n_layers ≤ ``MAX_DENSE``: the small nets): one float64 matrix product
      with the [K, n_layers] 0/1 membership matrix: one kernel. Small nets are launch-bound on a GPU, so
      the launches per call are what a call costs there (H200, MNIST-FC, ``python -m lca_lab.bench
      --layer-sums``: 6.6 µs of kernel time against 10.0 µs for ``"prefix"``, and 66.8 against 112.1 µs
      per call for 50 calls queued back to back, a float32 input's cast included).
    * ``"prefix"``: the flat vector holds each parameter tensor contiguously, so a layer is a few runs of
      consecutive entries. A float64 prefix sum along K, read at the end of every run, gives each run's
      sum as a difference, and a fixed [n_runs, n_layers] matrix of ±1 adds the runs into layers: three
      kernels, no atomics, and memory of the order of the runs, not of K.
    * ``"index_add"``: an index that interleaves layers entry by entry (a ±1 matrix over ``MAX_MATRIX``
      entries) falls back to ``index_add_``, which adds every entry atomically into one of n_layers
      slots; those atomics serialise on a GPU (H200, kernel time per call: 152 µs for MNIST-FC's 84,060
      entries in 3 layers, 359 µs for ResNet-20, 15 ms for 11 M entries in 62 layers; ``"prefix"``: 10,
      11 and 122 µs; ``python -m lca_lab.bench --layer-sums``).

    :meth:`with_total` returns the sums and the whole row's sum together, the whole row being one more
    column of the same product (``"dense"``, ``"prefix"``): the engine takes its total that way, so a
    caller's per-layer sums cost no launch beyond the total's.

    Integer-valued entries (counts) sum exactly below 2**53 every way.
    """

    MAX_DENSE = 1 << 22  # K × n_layers float64 entries of the membership matrix (32 MiB)
    MAX_MATRIX = 1 << 22  # n_runs × n_layers float64 entries (32 MiB)

    def __init__(self, index: torch.Tensor, n_layers: int, dense: bool | None = None):
        idx = index.detach().reshape(-1).to("cpu", torch.int64)
        self.n_layers = int(n_layers)
        self.K = int(idx.numel())
        if self.K and (int(idx.min()) < 0 or int(idx.max()) >= self.n_layers):
            raise ValueError(
                f"layer index out of range [0, {self.n_layers}): {int(idx.min())}…{int(idx.max())}"
            )
        dev = index.device
        self._index = index.detach().reshape(-1).long()
        self._dense = self._ends = self._w = self._first = None
        self._plus_total: tuple | None = None  # (dense, w, first) with the whole-row column, by with_total
        self.strategy = "index_add"
        if dense is None:  # on the CPU nothing is launch-bound: there the product measured slower
            dense = dev.type == "cuda"
        if dense and self.K and self.K * self.n_layers <= self.MAX_DENSE:
            m = torch.zeros(self.K, self.n_layers, dtype=torch.float64)
            m[torch.arange(self.K), idx] = 1.0
            self._dense = m.to(dev)
            self.strategy = "dense"
            return
        ends = torch.cat([torch.nonzero(idx[1:] != idx[:-1]).flatten(), torch.tensor([self.K - 1])])
        if self.K and len(ends) * self.n_layers <= self.MAX_MATRIX:
            runs = idx[ends]
            n_runs = len(ends)
            # layer l = Σ_s (C[e_s] − C[e_{s−1}])·[run s in l] = Σ_s C[e_s]·([run s in l] − [run s+1 in l])
            w = torch.zeros(n_runs, self.n_layers, dtype=torch.float64)
            w[torch.arange(n_runs), runs] += 1.0
            w[torch.arange(n_runs - 1), runs[1:]] -= 1.0
            self._ends, self._w = ends.to(dev), w.to(dev)
            self._first = w.sum(0).to(dev)  # Σ_s W[s]: one-hot of the first run's layer
            self.strategy = "prefix"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._sums(x, self._dense, self._w, self._first)

    def with_total(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [..., K] → (per-layer sums [..., n_layers], whole-row sums [...]), both float64.

        The whole row is one more column of the membership matrix (``"dense"``) or of the run matrix
        (``"prefix"``: the prefix sum at the row's last entry), so both come from one product: the kernels
        of ``__call__``, none more. ``"index_add"`` adds a ``sum``. The total is then the product's (or the
        prefix sum's) float64 sum, not ``x.sum()``'s; they differ by rounding (≈ K·2⁻⁵³ of Σ|x|). The
        matrix with the extra column is built at the first call (for ``"dense"`` a second membership
        matrix, at most ``MAX_DENSE`` + K entries).
        """
        if self._plus_total is None:
            self._plus_total = self._with_total_column()
        dense, w, first = self._plus_total
        if dense is None and w is None:  # index_add_, or no entries
            return self(x), x.sum(-1, dtype=torch.float64)
        both = self._sums(x, dense, w, first)
        return both[..., : self.n_layers], both[..., self.n_layers]

    def _with_total_column(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(dense, w, first) of ``_sums`` with one more column that sums the whole row."""
        if self._dense is not None:
            ones = torch.ones(self.K, 1, dtype=torch.float64, device=self._dense.device)
            return torch.cat([self._dense, ones], 1), None, None
        if self._w is not None:
            last = torch.zeros(self._w.shape[0], 1, dtype=torch.float64, device=self._w.device)
            last[-1] = 1.0  # Σ_s C[e_s]·([s in all] − [s+1 in all]) = C[e_last], the row's sum
            w = torch.cat([self._w, last], 1)
            return None, w, w.sum(0)
        return None, None, None

    def _sums(
        self, x: torch.Tensor, dense: torch.Tensor | None, w: torch.Tensor | None, first: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` [..., K] → [..., C]: the product with ``dense`` [K, C], or the prefix sums read at the run
        ends times ``w`` [n_runs, C] (``first`` = Σ_s w[s]), or with neither ``index_add_`` (C = n_layers)."""
        if x.shape[-1] != self.K:
            raise ValueError(f"expected [..., {self.K}] per-parameter values, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.K)
        if dense is not None:
            return (rows.to(torch.float64) @ dense).reshape(*lead, dense.shape[1])
        if w is None:  # empty, or layers interleaved entry by entry
            out = torch.zeros(rows.shape[0], self.n_layers, dtype=torch.float64, device=x.device)
            out.index_add_(1, self._index, rows.double())
            return out.reshape(*lead, self.n_layers)
        # One prefix sum over all rows (a 1-d scan runs device-wide; a scan along the last dim of a
        # [R, K] tensor does not), read at every row's run ends; row r's prefix starts at row r−1's last.
        c = torch.cumsum(rows.reshape(-1), 0, dtype=torch.float64).view(rows.shape[0], self.K)
        g = c.index_select(1, self._ends)
        out = g @ w
        if rows.shape[0] > 1:
            out[1:] -= g[:-1, -1:] * first
        return out.reshape(*lead, w.shape[1])
