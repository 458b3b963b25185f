"""Small models and datasets of "your own" kind, importable as config targets (``tests.own_parts.*``).

* :class:`TinyLM`: a one-block causal transformer taking ``input_ids=`` (dict inputs, as Hugging Face
  models do), returning ``{"logits": [B, T, V]}``, its output head tied to the token embedding, with
  LayerNorms.
* :func:`lm_data`: token windows whose targets are the next token, some set to -100 (not predicted).
* :class:`ItemDataset`: items read one by one through ``__getitem__`` (not whole tensors), so the
  streamed path really streams.
* :class:`MLP` / :func:`blobs`: a classifier on ``(x, y)`` pairs, for the command line's own-parts runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class TinyLM(nn.Module):
    """Token + position embedding, LayerNorm, one causal self-attention head, LayerNorm, tied head."""

    def __init__(self, n_classes: int = 11, width: int = 8, context: int = 6):
        super().__init__()
        self.tok = nn.Embedding(n_classes, width)
        self.pos = nn.Parameter(0.1 * torch.randn(context, width))
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes, bias=False)
        self.head.weight = self.tok.weight  # tied: one parameter under two names

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        T = input_ids.shape[-1]
        h = self.tok(input_ids) + self.pos[:T]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        return {"logits": self.head(self.ln_f(h))}


class DictItems(Dataset):
    """Items ``({"input_ids": x_i}, y_i)`` with the whole tensors as ``inputs`` / ``targets``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.inputs, self.targets = {"input_ids": x}, y

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return {"input_ids": self.inputs["input_ids"][i]}, self.targets[i]


class ItemDataset(Dataset):
    """The same items without whole-tensor attributes: every read goes through ``__getitem__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, dict_inputs: bool = True):
        self._x, self._y, self._dict = x, y, dict_inputs

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, i: int):
        x = {"input_ids": self._x[i]} if self._dict else self._x[i]
        return x, self._y[i]


def lm_tensors(n: int = 13, T: int = 6, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, T]`` token ids and next-token targets ``y [n, T]`` with about a fifth set to -100."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, T + 1), generator=g)
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    y[torch.rand(n, T, generator=g) < 0.2] = -100
    y[:, -1] = seq[:, -1]  # every window keeps a target
    return x, y


def lm_data(n: int = 40, T: int = 6, vocab: int = 11, streamed_items: bool = False) -> dict:
    """``{"train", "test", "n_classes"}`` of a tiny language-model task with dict inputs."""
    x, y = lm_tensors(n + n // 4, T, vocab)
    cls = ItemDataset if streamed_items else DictItems
    return {"train": cls(x[:n], y[:n]), "test": cls(x[n:], y[n:]), "n_classes": vocab}


class MLP(nn.Module):
    """A classifier of 2-D points (takes only the keys written in its config)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def blobs(n: int = 120, items: bool = False):
    """Three Gaussian blobs: ``{"train", "test"}`` of ``(x [2], y)`` pairs."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n + n // 4) % 3
    centres = torch.tensor([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    x = centres[y] + torch.randn(len(y), 2, generator=g)
    if items:
        return {"train": ItemDataset(x[:n], y[:n], False), "test": ItemDataset(x[n:], y[n:], False)}
    return {"train": TensorDataset(x[:n], y[:n]), "test": TensorDataset(x[n:], y[n:])}


def reference_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``L`` written out: mean over the counted targets of −log softmax at the target (all at once)."""
    logp = F.log_softmax(model(input_ids=x)["logits"], dim=-1)
    keep = y != -100
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def pair_targets(n: int = 30):
    """Points with two targets each (``y [n, 2]``): do not match a classifier's ``[n, C]`` logits."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return {"train": TensorDataset(x, torch.zeros(n, 2, dtype=torch.int64))}


class NoLogits(MLP):
    """Returns a tuple: neither a tensor of logits nor an object with ``logits``."""

    def forward(self, x: torch.Tensor):
        return (self.body(x),)


class BareItems(Dataset):
    """Items that are a single tensor, not ``(inputs, target)``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.zeros(2)


def bare_items():
    return {"train": BareItems()}
