"""Examples of a data split as L's passes and the training step see them: inputs, targets, chunks.

The contract for data and models of any kind (README "Your own model and data"):

* an example is ``(inputs, target)``: ``inputs`` a tensor, a tuple of tensors (the model is called as
  ``model(*inputs)``) or a dict of tensors (``model(**inputs)``, as Hugging Face models take them);
* ``target``: int64 class indices of any shape matching the logits' leading dims (one per example, or
  one per token); ``IGNORE`` (-100) marks "nothing to predict here" and is left out of L;
* the model returns logits ``[..., C]``, or an object or dict with ``logits``;
* ``L(θ) = Σ over the split of the per-target loss / the number of counted targets``.

Two sources give the same chunks in the same fixed, unshuffled order, so L is the same function of θ:
:class:`CachedExamples` holds the whole split on the device as tensors (the fast path where it fits);
:class:`StreamedExamples` reads a ``torch.utils.data.Dataset`` through a DataLoader (workers, pinned
memory, prefetch) for data that does not fit. This module imports torch only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate

IGNORE = -100  # a target that is not predicted (padding, prompt tokens): not counted in L

Tree = Union[torch.Tensor, tuple, dict]  # noqa: UP007  (a tensor, tuple or dict of tensors, leading dim N)


# ----------------------------------------------------------------------------------------------------------
# trees of tensors


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], x: Tree) -> Tree:
    """``fn`` applied to every tensor of ``x`` (same structure)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(tree_map(fn, v) for v in x)
    raise TypeError(
        f"inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(x).__name__}"
    )


def tree_leaves(x: Tree) -> list[torch.Tensor]:
    """The tensors of ``x`` in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in tree_leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tree_leaves(v)]
    raise TypeError(
        f"inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(x).__name__}"
    )


def tree_len(x: Tree) -> int:
    """The leading dimension N shared by the tensors of ``x``."""
    return int(tree_leaves(x)[0].shape[0])


def tree_cat(parts: Sequence[Tree]) -> Tree:
    """Concatenate trees of the same structure along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {k: tree_cat([p[k] for p in parts]) for k in first}
    return tuple(tree_cat([p[i] for p in parts]) for i in range(len(first)))


def call(fn: Callable[..., Any], inputs: Tree) -> Any:
    """``fn(inputs)``, ``fn(*inputs)`` or ``fn(**inputs)`` for a tensor, tuple or dict of inputs."""
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def args_kwargs(inputs: Tree) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a model call on ``inputs`` (for ``torch.func.functional_call``)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


# ----------------------------------------------------------------------------------------------------------
# model outputs and the loss per target


def logits_of(out: Any) -> torch.Tensor:
    """The logits ``[..., C]`` of a model output: the tensor itself, ``out["logits"]`` or ``out.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model returned {type(out).__name__}, which is neither a tensor of logits nor has `logits`"
    )


def target_loss(
    loss_fn: Callable[..., torch.Tensor],
    out: Any,
    y: torch.Tensor,
    reduction: str,
    mask_ignored: bool = False,
) -> torch.Tensor:
    """``loss_fn`` over every counted target of a batch: logits ``[..., C]`` against targets ``[...]``.

    Per-token targets (``y`` with more than one dim) are flattened to ``[M, C]`` / ``[M]``, so a loss of
    a classifier (``[N, C]`` against ``[N]``) serves a language model unchanged. ``mask_ignored``: drop
    the ``IGNORE`` targets here, for losses that do not skip them themselves (cross-entropy and NLL do,
    through ``ignore_index=-100``). ``reduction``: "sum" (L's passes), "mean" (the training step; the mean
    over counted targets), "none".
    """
    logits = logits_of(out)
    if y.dim() != 1:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    if mask_ignored:
        keep = (y != IGNORE).nonzero().squeeze(1)
        logits, y = logits.index_select(0, keep), y.index_select(0, keep)
    return loss_fn(logits, y, reduction=reduction)


def count_targets(y: torch.Tensor) -> int:
    """Number of counted (not ``IGNORE``) targets in ``y``."""
    return int((y != IGNORE).sum())


def correct_targets(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Number of counted targets whose arg-max logit is the target (0-d int64, no host sync)."""
    pred = logits_of(out).argmax(-1)
    return ((pred == y) & (y != IGNORE)).sum()


# ----------------------------------------------------------------------------------------------------------
# the items of a Dataset


def check_item(item: Any, where: str) -> tuple[Tree, torch.Tensor]:
    """``(inputs, target)`` of one Dataset item as tensors, or ``ValueError`` (one line) naming ``where``."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"{where}: an item must be (inputs, target), got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            + "; return (inputs, target) from __getitem__"
        )
    inputs, target = item
    try:
        tree_leaves(inputs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(target, torch.Tensor):
        try:
            target = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{where}: the target must be class indices (an int64 tensor), got {type(target).__name__}"
            ) from None
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"{where}: targets must be integer class indices, got dtype {target.dtype}")
    return inputs, target


def collate(items: Sequence[Any]) -> tuple[Tree, torch.Tensor]:
    """Stack Dataset items into ``(inputs [n, ...], targets [n, ...] int64)``."""
    inputs, targets = default_collate([(x, torch.as_tensor(y)) for x, y in items])
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return inputs, targets.to(torch.int64)


def whole_tensors(ds: Dataset) -> tuple[Tree, torch.Tensor] | None:
    """``(inputs, targets)`` of a Dataset that already holds them as whole tensors (no per-item reads):
    a ``TensorDataset`` of two tensors, or a Dataset with ``inputs`` and ``targets`` attributes whose first
    item is what ``ds[0]`` returns (a Dataset that transforms its items in ``__getitem__`` is read item by
    item)."""
    tensors = getattr(ds, "tensors", None)
    if isinstance(ds, torch.utils.data.TensorDataset) and tensors is not None and len(tensors) == 2:
        return tensors[0], tensors[1].to(torch.int64)
    inputs, targets = getattr(ds, "inputs", None), getattr(ds, "targets", None)
    if not isinstance(targets, torch.Tensor) or inputs is None:
        return None
    try:
        if not tree_len(inputs) == len(targets) == len(ds) or len(targets) == 0:  # type: ignore[arg-type]
            return None
        x0, y0 = ds[0]
        same = all(
            torch.equal(a, b) for a, b in zip(tree_leaves(x0), tree_leaves(tree_map(lambda t: t[0], inputs)))
        )
        same = same and torch.equal(torch.as_tensor(y0), targets[0])
    except (TypeError, IndexError, ValueError, RuntimeError):
        return None
    return (inputs, targets.to(torch.int64)) if same else None


def read_all(ds: Dataset, batch: int = 1024, workers: int = 0) -> tuple[Tree, torch.Tensor]:
    """Every item of ``ds`` collated in order: ``(inputs [N, ...], targets [N, ...])`` on the CPU."""
    whole = whole_tensors(ds)
    if whole is not None:
        return whole
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate)
    parts = list(loader)
    return tree_cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------------------------------------
# the two sources of chunks


class CachedExamples:
    """A whole split as tensors on one device: inputs (a tree, leading dim N) and targets [N, ...] int64."""

    streamed = False

    def __init__(self, inputs: Tree, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets
        self.n = int(targets.shape[0])
        self.n_counted = count_targets(targets)
        self.has_ignored = self.n_counted != targets.numel()
        self.target_shape = tuple(targets.shape[1:])

    def __len__(self) -> int:
        return self.n

    def chunks(self, size: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[Tree, torch.Tensor]]:
        """``(inputs, targets)`` of consecutive chunks of ``size`` examples of ``lo … hi − 1`` (default: the
        whole split; views, no copies)."""
        hi = self.n if hi is None else hi
        for s in range(lo, hi, size):
            e = min(s + size, hi)
            yield tree_map(lambda t, s=s, e=e: t[s:e], self.inputs), self.targets[s:e]

    def take(self, idx: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        """The examples ``idx`` [B] (a training batch)."""
        return tree_map(lambda t: t[idx], self.inputs), self.targets[idx]

    def head(self, k: int) -> Tree:
        """Inputs of the first ``k`` examples (to probe the model)."""
        return tree_map(lambda t: t[:k], self.inputs)


class StreamedExamples:
    """A split read from a Dataset in fixed, unshuffled chunks, each moved to ``device`` when it is used.

    ``workers`` DataLoader processes read ahead (``prefetch`` chunks each) into pinned memory on CUDA, so
    the device computes on one chunk while the next is read. ``n_counted``/``has_ignored`` come from one
    read of the targets at construction (:func:`fingerprint` reads them anyway).
    """

    streamed = True

    def __init__(
        self, ds: Dataset, device: torch.device | str, n_counted: int, n_targets: int,
        target_shape: tuple[int, ...], workers: int = 0, prefetch: int = 2,
    ):  # fmt: skip
        self.ds, self.device = ds, torch.device(device)
        self.n = len(ds)  # type: ignore[arg-type]
        self.n_counted, self.n_targets = int(n_counted), int(n_targets)
        self.has_ignored = self.n_counted != self.n_targets
        self.target_shape = tuple(target_shape)
        self.workers, self.prefetch = int(workers), int(prefetch)
        self._loaders: dict[int, DataLoader] = {}

    def on(self, device: torch.device | str) -> StreamedExamples:
        """The same split, its chunks moved to ``device``."""
        return StreamedExamples(
            self.ds, device, self.n_counted, self.n_targets, self.target_shape, self.workers, self.prefetch
        )

    def __len__(self) -> int:
        return self.n

    def _loader(self, size: int, lo: int = 0, hi: int | None = None) -> DataLoader:
        hi = self.n if hi is None else hi
        key = (size, lo, hi)
        if key not in self._loaders:
            extra = {"prefetch_factor": self.prefetch, "persistent_workers": True} if self.workers else {}
            ds = self.ds if (lo, hi) == (0, self.n) else Subset(self.ds, range(lo, hi))
            self._loaders[key] = DataLoader(
                ds, batch_size=size, shuffle=False, num_workers=self.workers, collate_fn=collate,
                pin_memory=self.device.type == "cuda", **extra,
            )  # fmt: skip
        return self._loaders[key]

    def _to_device(self, x: Tree, y: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        nb = self.device.type == "cuda"
        return tree_map(lambda t: t.to(self.device, non_blocking=nb), x), y.to(self.device, non_blocking=nb)

    def chunks(self, size: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[Tree, torch.Tensor]]:
        """Chunks of ``lo … hi − 1`` as :meth:`CachedExamples.chunks`, read through the DataLoader."""
        for x, y in self._loader(size, lo, hi):
            yield self._to_device(x, y)

    def take(self, idx: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        return self._to_device(*collate([self.ds[i] for i in idx.tolist()]))

    def head(self, k: int) -> Tree:
        return self._to_device(*collate([self.ds[i] for i in range(min(k, self.n))]))[0]


Examples = Union[CachedExamples, StreamedExamples]  # noqa: UP007


# ----------------------------------------------------------------------------------------------------------
# fingerprints


def _raw_bytes(t: torch.Tensor) -> Any:
    """The bytes of a tensor in row-major order, as a buffer over its own memory (no copy of a large
    split; any dtype, bfloat16 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


class _Hasher:
    """sha256 of a split's inputs (one digest per input tensor) and targets, fed chunk by chunk: the rows
    of a row-major tensor are its bytes in order, so whole tensors and chunks of them hash the same."""

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.targets = hashlib.sha256()
        self.n = self.n_counted = self.n_targets = 0
        self.top = -1

    def update(self, x: Tree, y: torch.Tensor) -> None:
        leaves = tree_leaves(x)
        if not self.leaves:
            self.leaves = [hashlib.sha256() for _ in leaves]
        for h, t in zip(self.leaves, leaves):
            h.update(_raw_bytes(t))
        y = y.detach().cpu().to(torch.int64).contiguous()
        self.targets.update(_raw_bytes(y))
        self.n, self.n_counted = self.n + len(y), self.n_counted + count_targets(y)
        self.n_targets += y.numel()
        self.top = max(self.top, int(y.max())) if y.numel() else self.top

    def result(self) -> dict[str, Any]:
        digests = b"".join(h.digest() for h in self.leaves) + self.targets.digest()
        return {"n": self.n, "n_counted": self.n_counted, "sha256": hashlib.sha256(digests).hexdigest()}


def fingerprint_tensors(inputs: Tree, targets: torch.Tensor) -> dict[str, Any]:
    """``{"n", "n_counted", "sha256"}`` of a split held as tensors. The hash covers inputs and targets in
    order (another split, order or preprocessing gives another hash) and equals that of the same split
    streamed (:func:`fingerprint_stream`)."""
    h = _Hasher()
    h.update(inputs, targets)
    return h.result()


def fingerprint_stream(ds: Dataset, batch: int = 1024, workers: int = 0) -> tuple[dict[str, Any], int, int]:
    """The fingerprint of a streamed split (one read of the data, no model), with its number of targets
    and its largest target (for the class count): ``(fingerprint, n_targets, max_target)``."""
    h = _Hasher()
    for x, y in DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate):
        h.update(x, y)
    return h.result(), h.n_targets, h.top
