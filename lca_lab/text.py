"""A byte-level language-model dataset over a text file (``data=text``), offline by default.

The corpus (a file's bytes, or by default the help topics of the standard library's ``pydoc_data``,
which every Python installation carries) is cut, from its first byte, into non-overlapping pieces of
``window + 1`` bytes. Example i is ``(piece_i[:-1], piece_i[1:])``: the model reads ``window`` bytes and
predicts, at every position, the byte that follows (``[window]`` int64 inputs and targets in 0..255,
vocabulary 256). A tail shorter than one piece is left out.

Pieces are split into train/test by ``np.random.default_rng(split_seed)``'s permutation (numpy's
generator, independent of the torch seed), which is also the training order. ``info`` records where the
bytes came from and their SHA-256, so a run file says exactly which text it learned.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["text", "TokenDataset", "DEFAULT_CORPUS", "VOCAB", "DEFAULT_MAX_BYTES"]

VOCAB = 256  # byte values
DEFAULT_CORPUS = "pydoc_data.topics"
# 64 KiB: 1,008 pieces of 65 bytes, 908 of them (58,112 target bytes) in the training split. One full
# pass of the default net=gpt (depth 2, width 64, 120,576 parameters) over them, in chunks of 256 windows
# in float32, measured 0.24 s forward and 0.58 s forward + backward on the 2-core CPU this was written
# on (torch 2.14, 2 threads, best of 3; 128 KiB took 0.40 s / 1.09 s), so the passes LCA makes per
# iteration stay affordable there.
DEFAULT_MAX_BYTES = 65_536


class TokenDataset(Dataset):
    """Language-model examples whose inputs are a dict, as Hugging Face models take them.

    Item i is ``({"input_ids": inputs["input_ids"][i]}, targets[i])``, each ``[window]`` int64.
    ``inputs`` ({"input_ids": [n, window]}) and ``targets`` ([n, window]) hold the whole split, so a
    caller can keep it as tensors without iterating over the items.
    """

    def __init__(self, input_ids: torch.Tensor, targets: torch.Tensor):
        if input_ids.shape != targets.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} differ")
        self.inputs = {"input_ids": input_ids}
        self.targets = targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"input_ids": self.inputs["input_ids"][i]}, self.targets[i]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_args(
    path: str | os.PathLike | None = None,
    window: int = 64,
    split_seed: int = 0,
    test_fraction: float = 0.1,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    dict_inputs: bool = False,
) -> None:
    """The checks of :func:`text`'s arguments that need no reading of the corpus (ValueError, one line)."""
    if not _is_int(window) or window < 1:
        raise ValueError(f"data.window={window!r} must be an integer ≥ 1 (bytes per example), e.g. 64")
    if not _is_int(split_seed) or split_seed < 0:
        raise ValueError(f"data.split_seed={split_seed!r} must be an integer ≥ 0")
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0 <= test_fraction < 1
    ):
        raise ValueError(
            f"data.test_fraction={test_fraction!r} must be a number in [0, 1): the share of windows held "
            "out for testing, e.g. 0.1"
        )
    if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < window + 1):
        raise ValueError(
            f"data.max_bytes={max_bytes!r} must be null (the whole text) or an integer ≥ data.window + 1 "
            f"= {window + 1 if _is_int(window) else '?'} (one example)"
        )
    if not isinstance(dict_inputs, bool):
        raise ValueError(f"data.dict_inputs={dict_inputs!r} must be true or false")
    if path is not None:
        _file(path)


def _file(path: str | os.PathLike) -> Path:
    """``path`` made absolute, checked to be an existing file (ValueError naming data.path otherwise)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"data.path={path!r} must be a file name, or null for the bundled corpus")
    p = Path(os.path.expanduser(str(path))).absolute()
    if not p.exists():
        raise ValueError(
            f"data.path={p} does not exist: give an existing text file or data.path=null for the "
            "bundled corpus"
        )
    if not p.is_file():
        raise ValueError(
            f"data.path={p} is not a file: give a text file or data.path=null for the bundled corpus"
        )
    return p


def _default_corpus() -> bytes:
    """The standard library's help topics (``pydoc_data.topics.topics``) in sorted key order, UTF-8."""
    from pydoc_data.topics import topics  # ships with CPython (the text behind help("keywords") etc.)

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def _read(path: str | os.PathLike | None, max_bytes: int | None) -> tuple[bytes, str, int]:
    """(the first ``max_bytes`` bytes of the corpus, its name for ``info``, the corpus's full size)."""
    if path is None:
        data = _default_corpus()
        return data[:max_bytes] if max_bytes is not None else data, DEFAULT_CORPUS, len(data)
    p = _file(path)
    with open(p, "rb") as f:  # read only what is used: the file may be much larger than max_bytes
        data = f.read() if max_bytes is None else f.read(max_bytes)
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"data.path={p} is empty: give a text file with at least data.window + 1 bytes")
    return data, str(p), size


def _pieces(data: bytes, window: int) -> torch.Tensor:
    """Non-overlapping pieces of ``window + 1`` bytes from the start: [n, window + 1] int64."""
    n = len(data) // (window + 1)
    arr = np.frombuffer(data, dtype=np.uint8, count=n * (window + 1))
    return torch.from_numpy(arr.astype(np.int64)).reshape(n, window + 1)


def text(
    path: str | os.PathLike | None = None,
    window: int = 64,
    split_seed: int = 0,
    test_fraction: float = 0.1,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    dict_inputs: bool = False,
) -> dict[str, Any]:
    """Byte-level next-token examples over a text file (module docstring).

    Args:
        path: a text file (any bytes, really); None = the standard library's ``pydoc_data`` help topics.
        window: bytes the model reads per example (its sequence length T).
        split_seed: seeds the permutation that splits the pieces and orders the training split.
        test_fraction: share of the pieces held out as the test split, in [0, 1) (rounded down).
        max_bytes: use only the first ``max_bytes`` bytes (None: all of them).
        dict_inputs: items ``({"input_ids": x}, y)`` (:class:`TokenDataset`) instead of ``(x, y)``.

    Returns:
        ``{"train": Dataset, "test": Dataset, "n_classes": 256, "info": {...}}``; each Dataset holds
        inputs and targets ``[n, window]`` int64 (targets = inputs shifted by one byte); ``info`` has
        ``corpus`` (``"pydoc_data.topics"`` or the file's absolute path), ``sha256`` and ``n_bytes`` of
        the bytes cut into pieces, ``source_n_bytes`` (the corpus's full size), ``window`` and
        ``encoding`` (``"bytes"``).

    Raises:
        ValueError: one line naming the ``data.`` key and the fix (missing, empty or too short file, bad
            window / test_fraction / max_bytes ...).
    """
    check_args(path, window, split_seed, test_fraction, max_bytes, dict_inputs)
    data, corpus, source_n_bytes = _read(path, max_bytes)
    if len(data) < window + 1:
        what = f"data.path={corpus}" if path is not None else f"the bundled corpus {corpus}"
        raise ValueError(
            f"{what} has {len(data)} bytes (after data.max_bytes), fewer than one example of "
            f"data.window + 1 = {window + 1}: give a longer text or a smaller data.window"
        )
    pieces = _pieces(data, window)  # [n, window + 1]
    used = data[: pieces.numel()]
    n = pieces.shape[0]
    n_test = int(n * test_fraction)
    perm = torch.from_numpy(np.random.default_rng(split_seed).permutation(n).astype(np.int64))
    train_idx, test_idx = perm[: n - n_test], perm[n - n_test :]
    info = {
        "corpus": corpus,
        "sha256": hashlib.sha256(used).hexdigest(),
        "n_bytes": len(used),
        "source_n_bytes": int(source_n_bytes),
        "window": int(window),
        "encoding": "bytes",
    }
    return {
        "train": _dataset(pieces[train_idx], dict_inputs),
        "test": _dataset(pieces[test_idx], dict_inputs),
        "n_classes": VOCAB,
        "info": info,
    }


def _dataset(pieces: torch.Tensor, dict_inputs: bool) -> Dataset:
    """Inputs ``pieces[:, :-1]`` and targets ``pieces[:, 1:]`` ([n, window] int64) as a Dataset."""
    x, y = pieces[:, :-1].contiguous(), pieces[:, 1:].contiguous()
    return TokenDataset(x, y) if dict_inputs else TensorDataset(x, y)


text.check_args = check_args  # type: ignore[attr-defined]
