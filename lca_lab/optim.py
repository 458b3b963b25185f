"""Optimizers with per-layer overrides: freeze (optionally from iteration k on), LR scale, momentum,
momentum delay (momentum = d / (d + 1), the paper's "information delay" of d steps).

Every layer (see ``nets.layer_groups``) gets its own parameter group, named by ``group["layer"]``,
so overrides are plain group settings and visible in ``optimizer.param_groups``.

A frozen layer stays in the optimizer with ``lr = 0``: its parameters then move by exactly 0.0
(SGD, Adam and RMSprop all scale their update by ``lr``), so its LCA is exactly zero while it is
still part of θ and of the run file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .nets import resolve_layers

OPTIMIZERS = ("sgd", "adam", "rmsprop")
OVERRIDE_KEYS = ("select", "freeze", "freeze_from", "lr_scale", "momentum", "momentum_delay")


@dataclass
class LayerPlan:
    """Resolved settings of one layer."""

    name: str
    lr_scale: float = 1.0
    momentum: float | None = None  # None: the optimizer's default
    freeze_from: int | None = None  # iteration from which lr is 0; 0 = frozen from the start
    sources: list[str] = field(default_factory=list)  # which override entries touched it


def momentum_from_delay(delay: float) -> float:
    """Momentum whose information delay is ``delay`` steps: d / (d + 1) (d = 9 → 0.9)."""
    if delay < 0:
        raise ValueError(f"momentum_delay must be ≥ 0, got {delay}")
    return float(delay) / (float(delay) + 1.0)


def plan_layers(
    groups: Sequence[tuple[str, list[str]]], overrides: Mapping[str, Mapping[str, Any]] | None
) -> list[LayerPlan]:
    """Apply the ``layers`` config entries to the layer list.

    ``overrides`` maps an entry name (e.g. ``last``) to a dict with ``select`` (a layer name, an
    index — negative counts from the output — or a list of them) and any of ``freeze`` (bool),
    ``freeze_from`` (iteration), ``lr_scale``, ``momentum``, ``momentum_delay``. Later entries win.
    """
    plans = [LayerPlan(name) for name, _ in groups]
    for entry_name, entry in (overrides or {}).items():
        if entry is None:
            continue
        unknown = set(entry) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(
                f"layers.{entry_name}: unknown key(s) {sorted(unknown)}; valid keys: {list(OVERRIDE_KEYS)}"
            )
        if entry.get("select") is None:
            raise ValueError(f"layers.{entry_name}.select is missing: give a layer name or index (e.g. -1)")
        sel = entry["select"]
        sel = [sel] if isinstance(sel, (str, int)) else list(sel)
        try:
            idx = resolve_layers(groups, sel)
        except ValueError as e:
            raise ValueError(f"layers.{entry_name}.select: {e}") from None
        if entry.get("momentum") is not None and entry.get("momentum_delay") is not None:
            raise ValueError(f"layers.{entry_name}: set either momentum or momentum_delay, not both")
        for i in idx:
            p = plans[i]
            p.sources.append(entry_name)
            if entry.get("lr_scale") is not None:
                if float(entry["lr_scale"]) < 0:
                    raise ValueError(f"layers.{entry_name}.lr_scale must be ≥ 0, got {entry['lr_scale']}")
                p.lr_scale = float(entry["lr_scale"])
            if entry.get("momentum") is not None:
                m = float(entry["momentum"])
                if not 0 <= m < 1:
                    raise ValueError(f"layers.{entry_name}.momentum must be in [0, 1), got {m}")
                p.momentum = m
            if entry.get("momentum_delay") is not None:
                try:
                    p.momentum = momentum_from_delay(float(entry["momentum_delay"]))
                except ValueError as e:
                    raise ValueError(f"layers.{entry_name}: {e}") from None
            if entry.get("freeze"):
                ff = entry.get("freeze_from")
                ff = 0 if ff is None else int(ff)
                if ff < 0:
                    raise ValueError(f"layers.{entry_name}.freeze_from must be ≥ 0, got {ff}")
                p.freeze_from = ff
    return plans


def build_optimizer(
    model: nn.Module,
    groups: Sequence[tuple[str, list[str]]],
    name: str,
    lr: float,
    plans: Sequence[LayerPlan] | None = None,
    momentum: float = 0.9,
    betas: Sequence[float] = (0.9, 0.999),
    alpha: float = 0.99,
    eps: float | None = None,
) -> torch.optim.Optimizer:
    """One parameter group per layer, with the plan's LR scale, momentum and freeze applied.

    For Adam the per-layer ``momentum`` sets β1 (its momentum coefficient); RMSprop and SGD use it
    directly. Layers frozen from iteration 0 start with lr = 0; ``apply_freezes`` handles later ones.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"opt.name={name!r} is not one of {list(OPTIMIZERS)}")
    plans = list(plans) if plans is not None else [LayerPlan(n) for n, _ in groups]
    named = dict(model.named_parameters())
    param_groups = []
    for (layer, pnames), plan in zip(groups, plans):
        g: dict[str, Any] = {
            "params": [named[n] for n in pnames],
            "layer": layer,
            "lr": lr * plan.lr_scale,
            "base_lr_scale": plan.lr_scale,
            "freeze_from": plan.freeze_from,
        }
        if plan.freeze_from == 0:
            g["lr"] = 0.0
        m = plan.momentum if plan.momentum is not None else None
        if name == "sgd":
            g["momentum"] = momentum if m is None else m
        elif name == "rmsprop":
            g["momentum"] = momentum if m is None else m
        elif name == "adam" and m is not None:
            g["betas"] = (m, float(betas[1]))
        param_groups.append(g)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=tuple(betas), eps=1e-8 if eps is None else eps)
    return torch.optim.RMSprop(
        param_groups, lr=lr, alpha=alpha, momentum=momentum, eps=1e-8 if eps is None else eps
    )


def apply_freezes(optimizer: torch.optim.Optimizer, iteration: int) -> None:
    """Set lr = 0 for layers whose ``freeze_from`` is ≤ ``iteration`` (call before each step)."""
    for g in optimizer.param_groups:
        ff = g.get("freeze_from")
        if ff is not None and iteration >= ff and g["lr"] != 0.0:
            g["lr"] = 0.0
