"""From what a ``data._target_`` returns to the run's splits (:class:`~lca_lab.data.DataBundle`).

A data target returns one of (README "Your own model and data"):

* a :class:`~lca_lab.data.DataBundle` (the built-in datasets: tensors with their source and indices);
* a mapping ``{"train": Dataset, "test": Dataset, "n_classes": int, "info": {...}}`` (only ``train`` is
  required; ``info`` is provenance recorded in the run file, e.g. a corpus and its hash);
* a ``torch.utils.data.Dataset`` (the training split; ``test_data._target_`` gives a test split).

Each split is either cached (every item collated into tensors, held on the run's device: the fast path)
or streamed (read from its Dataset chunk by chunk through a DataLoader), as ``lca.stream`` says; ``auto``
caches a split whose tensors fit in a quarter of the device's memory (host memory on the CPU). Both
give L the same chunks in the same order. Every split gets a fingerprint (sizes and a sha256 of its
inputs and targets), the same either way, so a recompute can check that it has the same data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import DataBundle
from .examples import (
    StreamedExamples,
    check_item,
    fingerprint_stream,
    fingerprint_tensors,
    read_all,
    tree_leaves,
    tree_map,
    whole_tensors,
)

MAPPING_KEYS = ("train", "test", "n_classes", "info")
CACHE_SHARE = 0.25  # auto caches a split whose tensors take at most this share of the device's memory


class DataContractError(ValueError):
    """What a data target returned does not follow the contract (one line naming the key and the fix)."""


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__"))


def _parts(result: Any, target: str) -> dict[str, Any]:
    """``{"train", "test", "n_classes", "info"}`` of a data target's result (not a DataBundle)."""
    if isinstance(result, Mapping):
        unknown = [k for k in result if k not in MAPPING_KEYS]
        if unknown or "train" not in result:
            raise DataContractError(
                f"data._target_={target} returned a mapping with keys {sorted(result)}; it needs 'train' "
                f"(a Dataset) and may have {', '.join(MAPPING_KEYS[1:])}"
            )
        parts = {k: result.get(k) for k in MAPPING_KEYS}
    elif _is_dataset(result):
        parts = {"train": result, "test": None, "n_classes": None, "info": None}
    else:
        raise DataContractError(
            f"data._target_={target} returned {type(result).__name__}: return a torch Dataset, "
            "{'train': Dataset, 'test': Dataset} or a lca_lab.data.DataBundle"
        )
    for split in ("train", "test"):
        if parts[split] is not None and not _is_dataset(parts[split]):
            raise DataContractError(
                f"data._target_={target}: '{split}' is {type(parts[split]).__name__}, not a torch Dataset"
            )
    if len(parts["train"]) == 0:
        raise DataContractError(f"data._target_={target}: the training split is empty")
    return parts


def _first_item(ds: Dataset, where: str) -> tuple[Any, torch.Tensor]:
    try:
        item = ds[0]
    except Exception as e:  # the user's __getitem__: say where it failed, in one line
        raise DataContractError(f"{where}: reading item 0 failed ({type(e).__name__}: {e})") from None
    try:
        return check_item(item, where)
    except ValueError as e:
        raise DataContractError(str(e)) from None


def _item_bytes(inputs: Any, target: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(inputs)) + target.numel() * 8


def memory_budget(device: torch.device) -> int:
    """Bytes ``lca.stream=auto`` lets one cached split take on ``device``."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(CACHE_SHARE * total)


def resolve_workers(setting: Any, device: torch.device) -> int:
    """DataLoader workers of streamed passes: on the CPU none (the passes use every core), on a GPU up to
    4 processes reading ahead while the device computes."""
    if setting != "auto":
        return int(setting)
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


def _stream_or_cache(ds: Dataset, setting: Any, device: torch.device, nbytes: int) -> bool:
    """True to stream the split: ``lca.stream`` true, or auto with tensors over the memory budget."""
    if setting == "auto":
        return whole_tensors(ds) is None and nbytes > memory_budget(device)
    return bool(setting)


def _n_classes(given: Any, ds: Dataset, top: int) -> int:
    if given is not None:
        return int(given)
    classes = getattr(ds, "classes", None)  # torchvision's ImageFolder, CIFAR10, MNIST …
    if isinstance(classes, (list, tuple)) and classes:
        return max(len(classes), top + 1)
    return top + 1


def bundle_from(
    result: Any, target: str, device: torch.device, stream: Any = "auto", workers: Any = "auto",
    test: Dataset | None = None,
) -> DataBundle:  # fmt: skip
    """The DataBundle of a data target's ``result`` (see the module docstring), its splits cached on
    ``device`` or streamed to it as ``stream`` (auto | true | false) says, with their fingerprints.
    ``test``: a test Dataset given separately (``test_data._target_``). Raises DataContractError."""
    if isinstance(result, DataBundle):
        if test is not None:
            raise DataContractError(f"test_data is set but data._target_={target} gives its own test split")
        return _fingerprinted(result).to(device)
    parts = _parts(result, target)
    if test is not None:
        if parts["test"] is not None:
            raise DataContractError(f"test_data is set but data._target_={target} gives its own test split")
        parts["test"] = test
    workers = resolve_workers(workers, device)
    train = _split(parts["train"], f"data._target_={target} (train)", device, stream, workers)
    test_split = (
        _split(parts["test"], f"data._target_={target} (test)", device, stream, workers)
        if parts["test"] is not None and len(parts["test"]) > 0
        else None
    )
    if test_split is None:
        test_split = _empty_like(train)
    n_classes = _n_classes(parts["n_classes"], parts["train"], max(train["top"], test_split["top"]))
    n = train["fingerprint"]["n"]
    return DataBundle(
        train_x=train["x"], train_y=train["y"], val_x=None, val_y=None, test_x=test_split["x"],
        test_y=test_split["y"], train_index=np.arange(n, dtype=np.int64), source=target.rpartition(".")[2],
        n_classes=n_classes, input_shape=train["input_shape"], test_index=np.arange(test_split["n"]),
        train_stream=train["stream"], test_stream=test_split["stream"], info=dict(parts["info"] or {}),
        fingerprint={"train": train["fingerprint"], "test": test_split["fingerprint"]},
    ).to(device)  # fmt: skip


def _split(ds: Dataset, where: str, device: torch.device, stream: Any, workers: int) -> dict[str, Any]:
    """One split, cached (``x``/``y`` on ``device``) or streamed (``stream``), with its fingerprint."""
    inputs0, target0 = _first_item(ds, where)
    nbytes = _item_bytes(inputs0, target0) * len(ds)
    out: dict[str, Any] = {"input_shape": tuple(tree_leaves(inputs0)[0].shape), "n": len(ds)}
    if _stream_or_cache(ds, stream, device, nbytes):
        fp, n_targets, top = fingerprint_stream(ds, workers=workers)
        examples = StreamedExamples(ds, device, fp["n_counted"], n_targets, tuple(target0.shape), workers)
        out.update(x=None, y=None, stream=examples, fingerprint=fp, top=top)
        return out
    try:
        x, y = read_all(ds, workers=workers)
    except (TypeError, RuntimeError) as e:  # items that cannot be stacked (ragged shapes, other types)
        raise DataContractError(f"{where}: the items cannot be stacked into tensors ({e})") from None
    top = int(y.max()) if y.numel() else -1
    out.update(x=x, y=y, stream=None, fingerprint=fingerprint_tensors(x, y), top=top)
    return out


def _empty_like(train: dict[str, Any]) -> dict[str, Any]:
    """An empty test split shaped like ``train``."""
    if train["stream"] is not None:
        return {"x": None, "y": torch.empty(0, dtype=torch.int64), "stream": None, "n": 0, "top": -1,
                "fingerprint": {"n": 0, "n_counted": 0, "sha256": ""}}  # fmt: skip
    x, y = tree_map(lambda t: t[:0], train["x"]), train["y"][:0]
    return {"x": x, "y": y, "stream": None, "n": 0, "top": -1, "fingerprint": fingerprint_tensors(x, y)}


def _fingerprinted(bundle: DataBundle) -> DataBundle:
    """A built-in bundle with the fingerprints of its train and test tensors."""
    if not bundle.fingerprint:
        bundle.fingerprint = {
            "train": fingerprint_tensors(bundle.train_x, bundle.train_y),
            "test": fingerprint_tensors(bundle.test_x, bundle.test_y),
        }
    return bundle
