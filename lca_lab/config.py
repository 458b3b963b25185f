"""Checks on a composed run config, made before any data is loaded or any compute is spent.

Every message names the key and a valid value, so the fix is in the message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .lca import PRECISIONS, check_engine_options
from .optim import OPTIMIZERS, OVERRIDE_KEYS

DATASETS = ("mnist", "mnist5k", "cifar10", "synthetic")
NETS = ("fc", "lenet", "allcnn", "resnet20", "vgg")
BOOL_KEYS = ("deterministic", "figures", "resume", "store.per_param", "store.trajectory", "lca.enabled",
             "lca.adaptive", "lca.per_class", "lca.test", "checkpoint.enabled")  # fmt: skip


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to use instead."""


def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def _positive_int(cfg, key: str, minimum: int = 1) -> None:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key} must be an integer ≥ {minimum}, got {v!r}")


def _number(cfg, key: str, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{key} must be {'>' if lo_open else '≥'} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(f"{key} must be {'<' if hi_open else '≤'} {hi}, got {v}")


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` for the first invalid value in a resolved run config (a plain dict)."""
    device = _get(cfg, "device")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device must be one of auto, cpu, cuda, cuda:N; got {device!r}")
    for key in ("epochs", "batch_size", "eval_every"):
        _positive_int(cfg, key)
    _positive_int(cfg, "seed", minimum=0)
    if _get(cfg, "data.name") not in DATASETS:
        raise ConfigError(f"data.name={_get(cfg, 'data.name')!r} is not one of {list(DATASETS)} (data=...)")
    fb = _get(cfg, "data.fallback")
    if fb not in (None, "mnist5k"):
        raise ConfigError(f"data.fallback must be mnist5k or null, got {fb!r}")
    if _get(cfg, "data.name") == "synthetic":
        _positive_int(cfg, "data.size", minimum=2)
        if _get(cfg, "data.shape") not in ("mnist", "cifar10"):
            raise ConfigError(f"data.shape must be mnist or cifar10, got {_get(cfg, 'data.shape')!r}")
        if _get(cfg, "batch_size") > _get(cfg, "data.size"):
            raise ConfigError(
                f"batch_size={_get(cfg, 'batch_size')} is larger than the training set "
                f"(data.size={_get(cfg, 'data.size')}); use batch_size ≤ {_get(cfg, 'data.size')}"
            )
    if _get(cfg, "net.name") not in NETS:
        raise ConfigError(f"net.name={_get(cfg, 'net.name')!r} is not one of {list(NETS)} (net=...)")
    opt = _get(cfg, "opt.name")
    if opt not in OPTIMIZERS:
        raise ConfigError(f"opt.name={opt!r} is not one of {list(OPTIMIZERS)} (opt=...)")
    _number(cfg, "opt.lr", lo=0, lo_open=True)
    if _get(cfg, "opt.momentum") is not None:
        _number(cfg, "opt.momentum", lo=0, hi=1, hi_open=True)
    decay = _get(cfg, "opt.lr_decay_epochs") or []
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in decay):
        raise ConfigError(f"opt.lr_decay_epochs must be a list of epoch numbers ≥ 1, got {list(decay)}")
    if decay:
        _number(cfg, "opt.lr_decay_factor", lo=0, hi=1, lo_open=True)

    lca = _get(cfg, "lca") or {}
    if lca.get("enabled", True):
        try:
            check_engine_options(
                lca.get("method"),
                _num_or_raise("lca.tolerance", lca.get("tolerance")),
                _int_or_raise("lca.max_splits", lca.get("max_splits")),
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if lca.get("chunk_size") != "auto":
            _positive_int(cfg, "lca.chunk_size")
        if lca.get("precision", "fp32") not in PRECISIONS:
            raise ConfigError(
                f"lca.precision must be one of {list(PRECISIONS)}, got {lca.get('precision')!r}"
            )
        from .speed import check_settings  # late: speed imports this module's ConfigError

        check_settings(lca, None, bool(_get(cfg, "deterministic")))  # auto | true | false, and their rules
        window = lca.get("window")
        if window is not None:
            w = list(window)
            if (
                len(w) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in w)
                or w[0] < 0
                or w[1] <= w[0]
            ):
                raise ConfigError(
                    f"lca.window must be [start, stop) iterations with 0 ≤ start < stop, got {w}"
                )
    for name, entry in (_get(cfg, "layers") or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"layers.{name} must be a mapping with keys {list(OVERRIDE_KEYS)}, got {entry!r}"
            )
        unknown = set(entry) - set(OVERRIDE_KEYS)
        if unknown:
            raise ConfigError(
                f"layers.{name}: unknown key(s) {sorted(unknown)}; valid: {list(OVERRIDE_KEYS)}"
            )
        _check_layer_entry(f"layers.{name}", entry)
    _number(cfg, "store.max_gb", lo=0, lo_open=True)
    _positive_int(cfg, "store.flush_every")
    _int_at_least(cfg, "data.split_seed", 0)
    for key in BOOL_KEYS:
        v = _get(cfg, key)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false, got {v!r}")
    if _get(cfg, "checkpoint.every") is not None:
        _positive_int(cfg, "checkpoint.every")
    if _get(cfg, "checkpoint.seconds") is not None:
        _number(cfg, "checkpoint.seconds", lo=0, lo_open=True)


def _int_at_least(cfg, key: str, minimum: int) -> None:
    if _get(cfg, key) is not None:
        _positive_int(cfg, key, minimum=minimum)


def _check_layer_entry(prefix: str, entry: Mapping[str, Any]) -> None:
    """Types and ranges of one ``layers.<name>`` override (layer names/indices are checked against the
    network once it is built)."""
    sel = entry.get("select")
    items = sel if isinstance(sel, (list, tuple)) else [sel]
    if sel is None or not items or any(isinstance(x, bool) or not isinstance(x, (int, str)) for x in items):
        raise ConfigError(f"{prefix}.select must be a layer name, an index (e.g. -1) or a list, got {sel!r}")
    sub = {k: entry.get(k) for k in OVERRIDE_KEYS}
    if sub["freeze"] is not None and not isinstance(sub["freeze"], bool):
        raise ConfigError(f"{prefix}.freeze must be true or false, got {sub['freeze']!r}")
    if sub["freeze_from"] is not None:
        v = sub["freeze_from"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{prefix}.freeze_from must be an iteration ≥ 0, got {v!r}")
    for key, lo, hi in (("lr_scale", 0, None), ("momentum", 0, 1), ("momentum_delay", 0, None)):
        v = sub[key]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{prefix}.{key} must be a number, got {v!r}")
        if v < lo or (hi is not None and v >= hi):
            rng = f"in [{lo}, {hi})" if hi is not None else f"≥ {lo}"
            raise ConfigError(f"{prefix}.{key} must be {rng}, got {v}")


def _num_or_raise(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _int_or_raise(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    return v


def check_group_choices(argv: list[str], conf_dir: Path) -> str | None:
    """The first ``group=option`` command-line override naming a config file that does not exist
    (e.g. ``experiment=tabel1``), as a one-line message listing the valid options; else None.

    Only plain values and comma-separated sweep lists are checked; Hydra's sweep functions
    (``choice(...)``, ``glob(...)``) and anything else are left to Hydra.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or not value or "(" in value or value == "null":
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for v in value.split(","):
            if v.strip() not in options:
                return f"{key}={v.strip()} does not exist; choose one of: {', '.join(options)} (conf/{key}/)"
    return None
