"""Checks on a composed config, made before any data is loaded or any compute is spent.

Types, choices, missing and unknown keys come from the typed schema (:mod:`lca_lab.schema`); ranges and
the rules between keys are written here. Every message is one line naming the key and a valid value, so
the fix is in the message (``ConfigError``; exit code 2 from the command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, MutableMapping
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .lca import check_engine_options
from .optim import OVERRIDE_KEYS
from .schema import (
    AUTO,
    SWITCH_KEYS,
    LCAConfig,
    RecomputeConfig,
    RecomputeLCAConfig,
    RunConfig,
    default_of,
    is_optional_key,
)

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to use instead."""


# ----------------------------------------------------------------------------------------------------------
# range rules: key → (what a valid value is, test of a value of the schema's type; None: described only)

Rule = tuple[str, Callable[[Any], bool] | None]
_AT_LEAST_1: Rule = ("an integer ≥ 1", lambda v: v >= 1)
_SWITCH: Rule = ("true or false (or auto)", lambda v: isinstance(v, bool) or v == AUTO)
_DEVICE: Rule = ("auto, cpu, cuda or cuda:N", lambda v: re.fullmatch(DEVICE_PATTERN, v) is not None)
_LCA_RULES: dict[str, Rule] = {
    "lca.tolerance": ("a number > 0 (nats per iteration)", None),  # check_engine_options
    "lca.max_splits": ("a power of two ≥ 2 (e.g. 32)", None),  # check_engine_options
    "lca.chunk_size": ("auto or an integer ≥ 1", lambda v: v == AUTO if isinstance(v, str) else v >= 1),
    "lca.batch_points": _AT_LEAST_1,
    **{f"lca.{k}": _SWITCH for k in SWITCH_KEYS},
    "lca.stream": _SWITCH,
    "lca.workers": ("auto or an integer ≥ 0", lambda v: v == AUTO if isinstance(v, str) else v >= 0),
}
RUN_RULES: dict[str, Rule] = {
    "seed": ("an integer ≥ 0", lambda v: v >= 0),
    "epochs": _AT_LEAST_1,
    "batch_size": _AT_LEAST_1,
    "eval_every": _AT_LEAST_1,
    "device": _DEVICE,
    "checkpoint.every": ("an integer ≥ 1 (iterations) or null", lambda v: v >= 1),
    "checkpoint.seconds": ("a number > 0 (seconds) or null", lambda v: v > 0),
    "store.per_param": _SWITCH,
    "store.flush_every": _AT_LEAST_1,
    "dist": _SWITCH,
    "dist_timeout": ("a number > 0 (seconds)", lambda v: v > 0),
    "store.max_gb": ("a number > 0 (GB)", lambda v: v > 0),
    "logger.init_timeout": ("a number > 0 (seconds)", lambda v: v > 0),
    "logger.log_every": _AT_LEAST_1,
    "logger.artifact_max_mb": ("a number ≥ 0 (MB; 0: never upload)", lambda v: v >= 0),
    **_LCA_RULES,
}
RECOMPUTE_RULES: dict[str, Rule] = {
    "shard": ("an integer ≥ 0", lambda v: v >= 0),
    "num_shards": ("an integer ≥ 1 or null", lambda v: v >= 1),
    "flush_every": _AT_LEAST_1,
    "device": _DEVICE,
    **_LCA_RULES,
}


# ----------------------------------------------------------------------------------------------------------
# the schema's part: types, choices, missing and unknown keys


def _as_plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """A composed config as a plain dict: a DictConfig resolved, a dict as it is (checked in place)."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
        except MissingMandatoryValue as e:
            raise ConfigError(f"{e.full_key} has no value (???); set it, e.g. {e.full_key}=VALUE") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"{e.full_key}: {str(e.msg).splitlines()[0]}") from None
    if not isinstance(cfg, MutableMapping):
        return dict(cfg)
    return cfg  # type: ignore[return-value]


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (tp, False)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007
    return tp, False


def _describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like, for a message."""
    tp, nullable = _strip_none(tp)
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Enum):
        text = "one of " + ", ".join(m.value for m in tp)
    elif tp is bool:
        text = "true or false"
    elif tp is int:
        text = "an integer"
    elif tp is float:
        text = "a number"
    elif tp is str:
        text = "a string"
    elif origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        text = "a list" + {int: " of integers", str: " of strings"}.get(item, "")
    elif origin is dict:
        text = "a mapping"
    else:
        text = " or ".join(_describe(a) for a in typing.get_args(tp))
    return text + (" or null" if nullable else "")


def _is_choice(tp: Any) -> bool:
    tp, _ = _strip_none(tp)
    return tp is bool or (isinstance(tp, type) and issubclass(tp, Enum))


def _dataclass_in(tp: Any) -> type | None:
    tp, _ = _strip_none(tp)
    return tp if dataclasses.is_dataclass(tp) else None


def _example(full: str, f: dataclasses.Field) -> Any:
    """A valid value for a message: the schema's default (for a recompute override, the run's default)."""
    v = default_of(f)
    if v is None and full.startswith("lca."):
        v = next((default_of(g) for g in dataclasses.fields(LCAConfig) if g.name == f.name), None)
    return None if v is dataclasses.MISSING else v


def _yaml(v: Any) -> str:
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    return str(v)


def _bad_value(full: str, value: Any, tp: Any, f: dataclasses.Field, rules: Mapping[str, Rule]) -> str:
    expect = rules[full][0] if full in rules else _describe(tp)
    msg = f"{full} must be {expect}, got {value!r}"
    example = _example(full, f)
    if example is not None and not _is_choice(tp) and full not in (f"lca.{k}" for k in SWITCH_KEYS):
        msg += f" (e.g. {full}={_yaml(example)})"
    return msg


def _plain(orig: Any, conv: Any) -> Any:
    """The checked value as the run receives it: plain YAML types, the original where it was already one
    (an integer given for a number stays an integer: the stored config text reads as written)."""
    if isinstance(conv, ListConfig):
        conv = OmegaConf.to_container(conv, enum_to_str=True)
    if isinstance(conv, Enum):
        conv = conv.value
    if type(conv) is float and type(orig) is int and conv == orig:
        return orig
    if type(conv) is type(orig) and conv == orig:
        return orig
    return conv


def _check_section(data: MutableMapping[str, Any], cls: type, prefix: str, rules: Mapping[str, Rule]) -> None:
    """Check ``data`` (one typed level) against dataclass ``cls``; convert its values in place."""
    flds = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in flds:
            raise ConfigError(_unknown(prefix, key, cls))
    hints = typing.get_type_hints(cls)
    node = OmegaConf.structured(cls)
    for name, f in flds.items():
        full, tp = prefix + name, hints[name]
        if name not in data:
            if is_optional_key(f):
                continue
            example = _example(full, f)
            value = "VALUE" if example is None else _yaml(example)
            raise ConfigError(f"{full} is missing; add it, e.g. +{full}={value}")
        value = data[name]
        if isinstance(value, str) and value == "???":
            raise ConfigError(f"{full} has no value (???); set it, e.g. {full}={_yaml(_example(full, f))}")
        sub = _dataclass_in(tp)
        _, nullable = _strip_none(tp)
        if value is None and nullable:
            continue
        if sub is not None or typing.get_origin(_strip_none(tp)[0]) is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full} must be a mapping (key: value), got {value!r}")
            if sub is not None:
                if not isinstance(value, MutableMapping):
                    value = data[name] = dict(value)
                _check_section(value, sub, full + ".", rules)
            continue
        if isinstance(value, str) and "${" in value and _strip_none(tp)[0] is str:
            continue  # a literal text (resolved already); OmegaConf would take it for an interpolation
        if _strip_none(tp)[0] is bool and not (
            isinstance(value, bool) or str(value).lower() in ("true", "false")
        ):
            # OmegaConf would take 3 or "yes" for true; a switch is spelled true or false ('false' quoted too)
            raise ConfigError(_bad_value(full, value, tp, f, rules))
        try:
            node[name] = value
            conv = node[name]
        except OmegaConfBaseException:
            raise ConfigError(_bad_value(full, value, tp, f, rules)) from None
        data[name] = _plain(value, conv)


def _unknown(prefix: str, key: Any, cls: type) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"a setting of {prefix[:-1]}" if prefix else "a top-level setting"
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    valid = ", ".join(n for n in names if not n.startswith("_"))
    return f"{prefix}{key} is not {where}{hint} (valid: {valid})"


def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _check_rules(cfg: Mapping[str, Any], rules: Mapping[str, Rule], cls: type, prefix: str = "") -> None:
    """The range rules for every key that is set (not null); ``cfg`` is the level at ``prefix``."""
    for key, (expect, test) in rules.items():
        if not key.startswith(prefix):
            continue
        v = _get(cfg, key[len(prefix) :])
        if v is None or test is None or test(v):
            continue
        f = _field(cls, key[len(prefix) :])
        msg = f"{key} must be {expect}, got {v!r}"
        example = _example(key, f) if f is not None else None
        if example is not None and "(e.g." not in expect and expect != _SWITCH[0] and expect != _DEVICE[0]:
            msg += f" (e.g. {key}={_yaml(example)})"
        raise ConfigError(msg)


def _field(cls: type, dotted: str) -> dataclasses.Field | None:
    hints = typing.get_type_hints(cls)
    head, _, rest = dotted.partition(".")
    f = next((g for g in dataclasses.fields(cls) if g.name == head), None)
    if f is None or not rest:
        return f
    sub = _dataclass_in(hints[head])
    return _field(sub, rest) if sub is not None else None


def check_typed(
    cfg: Mapping[str, Any] | DictConfig, schema: type, rules: Mapping[str, Rule], prefix: str = ""
) -> dict[str, Any]:
    """``cfg`` (the level at ``prefix``, e.g. ``"lca."``) checked against dataclass ``schema`` and the
    range ``rules`` (keyed by full key); returned as a plain dict (a dict given is updated in place:
    choices as strings, values converted to the schema's types)."""
    plain = _as_plain(cfg)
    _check_section(plain, schema, prefix, rules)
    _check_rules(plain, rules, schema, prefix)
    return plain


# ----------------------------------------------------------------------------------------------------------
# python -m lca_lab


def validate(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """Check a composed run config; raise ``ConfigError`` (one line) for the first invalid value.

    Returns the config as a plain dict of the schema's types (a dict given is checked and updated in
    place, keeping its key order; a DictConfig is resolved first).
    """
    cfg = check_typed(cfg, RunConfig, RUN_RULES)
    _check_lca(cfg)
    _check_parts(cfg)
    return cfg


def _check_lca(cfg: Mapping[str, Any]) -> None:
    lca = cfg["lca"]
    try:
        check_engine_options(lca["method"], lca["tolerance"], lca["max_splits"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    window = lca.get("window")
    if window is not None and (len(window) != 2 or window[0] < 0 or window[1] <= window[0]):
        raise ConfigError(
            f"lca.window must be [start, stop) iterations with 0 ≤ start < stop, got {list(window)}"
        )
    _check_estimate(lca)
    if not lca["enabled"]:
        return
    from .speed import check_settings  # late: speed imports this module's ConfigError

    check_settings(lca, None, bool(cfg["deterministic"]))  # the rules between the speed switches


def _check_estimate(lca: Mapping[str, Any]) -> None:
    """``lca.estimate``/``lca.subset``/``lca.subset_fixed`` (missing keys: their defaults, exact)."""
    from .estimate import check_estimate

    estimate = lca.get("estimate") or "exact"
    try:
        check_estimate(estimate, lca.get("subset", 0.1), lca.get("subset_fixed") or False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if estimate == "subset":
        for key, why in (("per_class", "per-class LCA"), ("test", "held-out LCA")):
            if lca.get(key):
                raise ConfigError(
                    f"lca.estimate=subset does not estimate {why} yet; "
                    f"set lca.{key}=false or lca.estimate=exact"
                )


def _check_parts(cfg: Mapping[str, Any]) -> None:
    """The open sections: what is built (a ``_target_``) and the values lca_lab itself reads."""
    for key in ("data", "net", "opt", "loss"):
        section = cfg.get(key)
        if section is None and key == "loss":
            continue
        if "_target_" not in section and "name" not in section:
            raise ConfigError(
                f"{key} has no _target_: choose a {key} file ({key}=...) or set {key}._target_=package.Class"
            )
    data, opt = cfg["data"], cfg["opt"]
    fb = data.get("fallback")
    if fb not in (None, "mnist5k"):
        raise ConfigError(f"data.fallback must be mnist5k or null, got {fb!r}")
    if data.get("split_seed") is not None:
        _int_in(cfg, "data.split_seed", 0)
    if data.get("name") == "synthetic" or data.get("_target_") == "lca_lab.data.synthetic":
        _int_in(cfg, "data.size", 2)
        if data.get("shape") not in ("mnist", "cifar10"):
            raise ConfigError(f"data.shape must be mnist or cifar10, got {data.get('shape')!r}")
        if cfg["batch_size"] > data["size"]:
            raise ConfigError(
                f"batch_size={cfg['batch_size']} is larger than the training set "
                f"(data.size={data['size']}); use batch_size ≤ {data['size']}"
            )
    if "lr" in opt:
        _number(cfg, "opt.lr", lo=0, lo_open=True)
    if opt.get("momentum") is not None:
        _number(cfg, "opt.momentum", lo=0, hi=1, hi_open=True)
    decay = opt.get("lr_decay_epochs") or []
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in decay):
        raise ConfigError(f"opt.lr_decay_epochs must be a list of epoch numbers ≥ 1, got {list(decay)}")
    if decay:
        _number(cfg, "opt.lr_decay_factor", lo=0, hi=1, lo_open=True)
    for name, entry in cfg["layers"].items():
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


def _int_in(cfg, key: str, minimum: int) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# python -m lca_lab.recompute


def validate_recompute(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """Check a composed recompute config (conf/recompute.yaml); ConfigError (one line) for the first
    invalid value. Returns it as a plain dict of the schema's types."""
    cfg = check_typed(cfg, RecomputeConfig, RECOMPUTE_RULES)
    check_lca_overrides(cfg["lca"])
    return cfg


def check_lca_overrides(lca: Mapping[str, Any]) -> dict[str, Any]:
    """Check recompute ``lca`` settings (each null: the training run's value) against the schema's lca
    types and ranges; return them converted (a dict given is updated in place)."""
    lca = check_typed(lca, RecomputeLCAConfig, _LCA_RULES, prefix="lca.")
    m, tol, ms = lca.get("method"), lca.get("tolerance"), lca.get("max_splits")
    try:
        check_engine_options(m or "rk4", 1.0 if tol is None else tol, 2 if ms is None else ms)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_estimate({k: v for k, v in lca.items() if v is not None})
    return lca


# ----------------------------------------------------------------------------------------------------------
# the command lines: Hydra's own errors in one line


def hydra_error_line(exc: BaseException, argv: list[str], schema: type) -> str:
    """One line for an error Hydra raises while composing the config (an override it cannot apply or
    parse), naming the key and the fix."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    cause = exc.__cause__
    m = re.match(r"Could not override '([^']+)'", lines[0])
    if m and "not in struct" in str(cause):
        key = m.group(1)
        head, _, name = key.rpartition(".")
        cls = _section_class(schema, head)
        if cls is not None and name not in {f.name for f in dataclasses.fields(cls)}:
            return _unknown(f"{head}." if head else "", name, cls)
        append = lines[1].replace("To append to your config use ", "") if len(lines) > 1 else f"+{key}=..."
        return f"{key} is not a key of {head or 'the config'}; to add it, write {append}"
    if type(exc).__name__ == "OverrideParseException":
        bad = _unparsable(argv)
        return (
            f"cannot parse the override{' ' + bad if bad else ''}: {lines[0]} "
            "(see https://hydra.cc/docs/advanced/override_grammar/basic/)"
        )
    if isinstance(cause, OmegaConfBaseException):
        return f"{lines[0]} {str(cause).splitlines()[0]}"
    return lines[0]


def _section_class(schema: type, dotted: str) -> type | None:
    """The dataclass of a typed level (``""``: the top), or None for an open mapping or no key."""
    cls: type | None = schema
    for part in filter(None, dotted.split(".")):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = _dataclass_in(hints[part])
        if cls is None:
            return None
    return cls


def _unparsable(argv: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_override(arg)
        except Exception:
            return arg
    return None


def run_cli(main: Callable[[], Any], schema: type) -> Any:
    """Run a ``@hydra.main`` function so that an error Hydra raises while composing the config is one
    line on stderr and exit code 2 (Hydra itself prints several lines and exits 1). Errors raised by the
    task function itself are left as they are; with ``HYDRA_FULL_ERROR=1`` set by the user, so is all."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing
    try:
        return main()
    except Exception as e:
        if _raised_by_task(e):
            raise
        print(f"error: {hydra_error_line(e, sys.argv[1:], schema)}", file=sys.stderr)
        sys.exit(2)


def _raised_by_task(exc: BaseException) -> bool:
    """Whether an exception passed through Hydra's ``run_job`` (the task function), not composition."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_job":
            return True
        tb = tb.tb_next
    return False
