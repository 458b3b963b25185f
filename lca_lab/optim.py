"""Optimizers with per-layer overrides: freeze (optionally from iteration k on), LR scale, momentum,
momentum delay (momentum = d / (d + 1), the paper's "information delay" of d steps).

The optimizer is any class named by the ``opt`` config's ``_target_`` (``torch.optim.SGD``, ``Adam``,
``RMSprop``, ``NAdam`` …). Every layer (see ``nets.layer_groups``) gets its own parameter group, named
by ``group["layer"]``,
so overrides are plain group settings and visible in ``optimizer.param_groups``.

A frozen layer stays in the optimizer with ``lr = 0``: its parameters then move by exactly 0.0
(SGD, Adam and RMSprop all scale their update by ``lr``), so its LCA is exactly zero while it is
still part of θ and of the run file.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .nets import resolve_layers

SCHEDULE_KEYS = ("lr_decay_epochs", "lr_decay_factor")  # read by lca_lab, not passed to the optimizer
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


def optimizer_kwargs(opt_cfg: Mapping[str, Any], opt_cls: Any = None) -> dict[str, Any]:
    """The keyword arguments an ``opt`` config passes to its optimizer: every key but ``_target_``,
    Hydra's own ``_…_`` keys and the schedule (``lr_decay_epochs``, ``lr_decay_factor``, read by lca_lab).
    Lists become tuples (``betas``).

    ``momentum`` is the optimizer's momentum coefficient, whatever the optimizer calls it: given
    ``opt_cls``, it is passed as ``momentum`` where the optimizer takes one (SGD, RMSprop) and as
    ``betas[0]`` where it takes ``betas`` instead (Adam, NAdam, AdamW, …; ``betas[1]`` from the config or
    the optimizer's default), so ``opt._target_=torch.optim.NAdam`` works from ``opt=sgd``. A momentum of
    0 or null for an optimizer with neither is dropped; any other is refused (ValueError naming the fix).
    """
    kwargs = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in opt_cfg.items()
        if not (k.startswith("_") and k.endswith("_")) and k not in SCHEDULE_KEYS
    }
    return _momentum_as_taken(kwargs, opt_cls) if opt_cls is not None else kwargs


def _momentum_as_taken(kwargs: dict[str, Any], opt_cls: Any) -> dict[str, Any]:
    """``kwargs`` with ``momentum`` under the name ``opt_cls`` takes it by (see :func:`optimizer_kwargs`)."""
    try:
        params = inspect.signature(opt_cls).parameters
    except (TypeError, ValueError):  # no signature to read: pass the keys as written
        return kwargs
    if "momentum" not in kwargs or "momentum" in params:
        return kwargs
    m = kwargs.pop("momentum")
    if "betas" in params:
        if m is not None:
            default = params["betas"].default
            beta2 = kwargs.get("betas", default if default is not inspect.Parameter.empty else (0.9, 0.999))[
                1
            ]
            kwargs["betas"] = (float(m), float(beta2))
        return kwargs
    if m:
        name = getattr(opt_cls, "__qualname__", str(opt_cls))
        raise ValueError(
            f"opt.momentum={m}: {name} takes neither momentum nor betas; drop it with ~opt.momentum"
        )
    return kwargs


def build_optimizer(
    model: nn.Module,
    groups: Sequence[tuple[str, list[str]]],
    opt_cfg: Mapping[str, Any],
    plans: Sequence[LayerPlan] | None = None,
) -> torch.optim.Optimizer:
    """The ``opt`` config's optimizer over one parameter group per layer, with the plans applied.

    ``opt_cfg`` is the ``opt`` config section: ``_target_`` (any ``torch.optim.Optimizer`` class, or a
    callable taking the param groups first) and its keyword arguments, e.g. ``{"_target_":
    "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}``; ``lr_decay_epochs`` / ``lr_decay_factor`` are left
    out (see :func:`optimizer_kwargs`). It is built with ``hydra.utils.instantiate`` and the layer groups
    as ``params``. Each group gets ``lr = lr × lr_scale`` (0 for a layer frozen from iteration 0;
    :func:`apply_freezes` handles later ones). A per-layer momentum sets the group's ``momentum`` where
    the optimizer has one (SGD, RMSprop), else ``betas[0]`` (Adam-like); an optimizer with neither is
    refused (ValueError naming the layers entry).
    """
    from hydra.utils import instantiate  # lazy: the library use of this module needs no Hydra

    plans = list(plans) if plans is not None else [LayerPlan(n) for n, _ in groups]
    named = dict(model.named_parameters())
    param_groups = [
        {
            "params": [named[n] for n in pnames],
            "layer": layer,
            "base_lr_scale": plan.lr_scale,
            "freeze_from": plan.freeze_from,
        }
        for (layer, pnames), plan in zip(groups, plans)
    ]
    opt_cls = instantiate({"_target_": opt_cfg["_target_"], "_partial_": True}).func
    kwargs = optimizer_kwargs(opt_cfg, opt_cls)
    # The target through instantiate; the arguments as plain Python (no OmegaConf containers in the groups).
    optimizer = opt_cls(param_groups, **kwargs)
    base_lr = optimizer.defaults.get("lr")
    for g, plan in zip(optimizer.param_groups, plans):
        if plan.lr_scale != 1.0 or plan.freeze_from == 0:
            if base_lr is None:
                raise ValueError(
                    f"layers overrides ({', '.join(plan.sources)}) set a per-layer learning rate, but "
                    f"{opt_cfg['_target_']} has no lr"
                )
            g["lr"] = 0.0 if plan.freeze_from == 0 else base_lr * plan.lr_scale
        if plan.momentum is None:
            continue
        if "momentum" in optimizer.defaults:
            g["momentum"] = plan.momentum
        elif "betas" in optimizer.defaults:
            g["betas"] = (plan.momentum, float(g["betas"][1]))
        else:
            raise ValueError(
                f"layers.{plan.sources[-1]}: {opt_cfg['_target_']} has neither momentum nor betas, so a "
                "per-layer momentum (momentum / momentum_delay) cannot be set; remove it or choose "
                "another opt"
            )
    return optimizer


def apply_freezes(optimizer: torch.optim.Optimizer, iteration: int) -> None:
    """Set lr = 0 for layers whose ``freeze_from`` is ≤ ``iteration`` (call before each step)."""
    for g in optimizer.param_groups:
        ff = g.get("freeze_from")
        if ff is not None and iteration >= ff and g["lr"] != 0.0:
            g["lr"] = 0.0
