"""A run's parts — data, network, loss, optimizer — built from the config's ``_target_``\\ s.

Each of the config sections ``data``, ``net``, ``opt`` and ``loss`` names a class or function
(``_target_``, a dotted import path) and its keyword arguments; lca_lab's own choices are files in
``conf/<group>/`` pointing at ``lca_lab.nets.*``, ``lca_lab.data.*``, ``torch.optim.*`` and
``torch.nn.*``. What lca_lab adds to the config's arguments:

* **data**: nothing. The target returns a :class:`~lca_lab.data.DataBundle` (the built-in datasets),
  ``{"train": Dataset, "test": Dataset, …}`` or a Dataset (:mod:`lca_lab.splits`: cached on the run's
  device or streamed to it); ``test_data`` builds a separate test Dataset.
* **net**: the data's ``input_shape`` (of one example's first input tensor) and ``n_classes``, each only
  when the target's signature has a parameter of that name and the config does not set it. The target
  returns an ``nn.Module`` giving logits ``[..., C]`` (or ``.logits``) for the data's inputs, checked on
  two examples before training (:func:`probe_model`); ``torch.manual_seed(seed)`` runs just before it.
* **opt**: the per-layer param groups as its first argument (``params``); ``lr_decay_epochs`` and
  ``lr_decay_factor`` are read by lca_lab and not passed (:mod:`lca_lab.optim`).
* **loss**: ``reduction="sum"`` for L's passes and evaluation, ``reduction="mean"`` for the training step.

:func:`check_parts` checks all this before any data is loaded (importable targets, known keyword
arguments, the built-in nets' own argument checks); :func:`check_targets` refuses targets outside an
allowlist in a config read back from a file; :func:`upgrade_config` maps the config shape of run files
written before targets (``net.name``, ``data.name``, ``opt.name``) to this one; :func:`build_parts`
builds everything for ``train.run`` and the recompute.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .data import DataBundle, DatasetUnavailableError
from .nets import layer_groups
from .optim import LayerPlan, build_optimizer, optimizer_kwargs, plan_layers

__all__ = [
    "ALLOWED_TARGETS",
    "Parts",
    "build_data",
    "build_loss",
    "build_model",
    "build_parts",
    "check_parts",
    "check_targets",
    "locate",
    "upgrade_config",
]

# Targets a config read back from a file may name without the reader's say-so (fnmatch patterns).
ALLOWED_TARGETS = ("lca_lab.*", "torch.*", "torchvision.*")
# ... except these, which load or run code or files named by their arguments; a user may still list one
# in allow_targets explicitly.
REFUSED_TARGETS = (
    "torch.hub.*",
    "torch.load",
    "torch.serialization.*",
    "torch.jit.load",
    "torch.package.*",
    "torch.utils.cpp_extension.*",
    "torch.ops.*",
    "torch.classes.*",
    "torch.distributed.*",
    "torchvision.io.*",
)
NET_PROVIDED = ("input_shape", "n_classes")  # what lca_lab passes to a net target that names them
DEFAULT_LOSS = {"_target_": "torch.nn.CrossEntropyLoss"}
_SECTIONS = ("data", "net", "opt", "loss")


def _instantiate(node: Mapping[str, Any], **extra: Any) -> Any:
    """``hydra.utils.instantiate(node, **extra)`` (arguments as plain Python), re-raising the target's own
    exception rather than Hydra's wrapper, so e.g. ``DatasetUnavailableError`` reaches the CLI as itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(dict(node), _convert_="all", **extra)
    except InstantiationException as e:
        if isinstance(e.__cause__, Exception):
            raise e.__cause__ from None
        raise


def _hydra_keys(node: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a ``_target_`` section: every key but Hydra's ``_…_`` ones."""
    return {k: v for k, v in node.items() if not (str(k).startswith("_") and str(k).endswith("_"))}


def _fix_hint(key: str) -> str:
    group = key.split(".")[0]
    return f"choose {group}=<option> (conf/{group}/) or set {key}=<module.Class> (its module on PYTHONPATH)"


def locate(target: Any, key: str) -> Callable[..., Any]:
    """The object a ``_target_`` names; ``ConfigError`` in one line naming ``key`` when it cannot be
    imported (for a name missing from lca_lab.nets / lca_lab.data: with the built-in choices)."""
    from hydra.utils import get_object

    if not isinstance(target, str) or not target:
        raise ConfigError(
            f"{key} must be a dotted import path (module.Class), got {target!r}; {_fix_hint(key)}"
        )
    hydra_log = logging.getLogger("hydra.utils")
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)  # it logs the failure over several lines; ours is one
    try:
        obj = get_object(target)
    except Exception as e:  # ImportError, AttributeError, or an error while importing the user's module
        cause = " ".join(str(e).split())
        builtins = _builtins_of(target)
        extra = f"; the built-in ones are {', '.join(builtins)}" if builtins else f"; {_fix_hint(key)}"
        raise ConfigError(f"{key}={target} cannot be imported ({cause[:200]}){extra}") from None
    finally:
        hydra_log.setLevel(level)
    if not callable(obj):
        raise ConfigError(f"{key}={target} is not a class or function; {_fix_hint(key)}")
    return obj


def _builtins_of(target: str) -> list[str]:
    """lca_lab's own targets next to a missing one (``lca_lab.nets.resnet18`` → the net factories)."""
    module = target.rpartition(".")[0]
    if module == "lca_lab.nets":
        from . import nets

        return [f"{module}.{n}" for n, f in vars(nets).items() if callable(getattr(f, "check_args", None))]
    if module == "lca_lab.data":
        from . import data

        return [f"{module}.{n}" for n in data.__all__ if inspect.isfunction(getattr(data, n, None))]
    return []


def _signature(obj: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none: leave the arguments to the call
        return None


def _bind(key: str, obj: Callable[..., Any], target: str, kwargs: Mapping[str, Any], provided: Sequence[str]):
    """Check ``kwargs`` (plus the names lca_lab ``provided``) against ``obj``'s signature, in one line."""
    sig = _signature(obj)
    if sig is None:
        return
    params = sig.parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
    shown = [n for n in valid if n not in provided]
    if not open_kwargs:
        unknown = [
            k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY
        ]
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]} is not an argument of {target}; valid keys: "
                f"{', '.join(shown) or '(none)'} (drop it with ~{key}.{unknown[0]})"
            )
    placeholders = {n: None for n in provided if n in params}
    try:
        sig.bind(**placeholders, **kwargs)
    except TypeError as e:
        missing = [
            n for n, p in params.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n not in kwargs and n not in placeholders
        ]  # fmt: skip
        if missing:
            raise ConfigError(
                f"{key}.{missing[0]} is required by {target}: set +{key}.{missing[0]}=..."
            ) from None
        raise ConfigError(f"{key}: {e} ({target})") from None


def check_parts(cfg: Mapping[str, Any]) -> None:
    """Check the ``data``, ``net``, ``opt`` and ``loss`` sections before any data is loaded.

    Each present section must have an importable ``_target_`` whose signature takes the section's keys
    (and what lca_lab adds, see the module docstring); the built-in nets' own argument checks run too
    (``net.width=-3``), as does the rule that a per-layer momentum needs an optimizer with ``momentum`` or
    ``betas``. Raises ``ConfigError`` with one line naming the key and the fix.
    """
    for section in _SECTIONS:
        node = cfg.get(section)
        if node is None:
            if section == "loss":
                continue  # the default cross-entropy
            if section in cfg:
                raise ConfigError(f"{section} is null; {_fix_hint(section + '._target_')}")
            continue
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise ConfigError(f"{section} has no _target_; {_fix_hint(section + '._target_')}")
        target = node["_target_"]
        obj = locate(target, f"{section}._target_")
        kwargs = _hydra_keys(node)
        if section == "net":
            _bind(section, obj, target, kwargs, NET_PROVIDED)
            check = getattr(obj, "check_args", None)
            if callable(check):
                try:
                    check(**{k: v for k, v in kwargs.items() if k not in NET_PROVIDED})
                except ValueError as e:
                    raise ConfigError(f"net.{e}") from None
        elif section == "opt":
            try:  # opt.momentum as the optimizer takes it (momentum or betas[0])
                kwargs = optimizer_kwargs(kwargs, obj)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            _bind(section, obj, target, kwargs, ("params",))
            _check_layer_momentum(cfg, obj, target)
        elif section == "loss":
            sig = _signature(obj)
            if sig is not None and "reduction" not in sig.parameters:
                raise ConfigError(
                    f"loss._target_={target} takes no 'reduction' argument; lca_lab needs one "
                    "(reduction='sum' for L, 'mean' for the training step): use a torch loss class"
                )
            _bind(section, obj, target, kwargs, ("reduction",))
        else:
            _bind(section, obj, target, kwargs, ())
            _check_data_args(section, obj, kwargs)
        _check_nested_targets(section, kwargs)
    test = cfg.get("test_data")
    if test is not None:
        if not isinstance(test, Mapping) or "_target_" not in test:
            raise ConfigError(
                "test_data has no _target_; set +test_data._target_=<a Dataset class or function>"
            )
        _bind(
            "test_data",
            locate(test["_target_"], "test_data._target_"),
            test["_target_"],
            _hydra_keys(test),
            (),
        )


def _check_data_args(section: str, obj: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """A built-in data target's own argument check (``data.path`` missing …), before anything is read."""
    check = getattr(obj, "check_args", None)
    if section == "data" and callable(check):
        try:
            check(**kwargs)
        except ValueError as e:
            raise ConfigError(" ".join(str(e).split())) from None


def _check_nested_targets(section: str, kwargs: Mapping[str, Any]) -> None:
    """Nested targets (``net.config._target_=transformers.GPT2Config``) must import. Their keys are left to
    the call: configuration classes such as Hugging Face's take keys their signatures do not list."""
    for key, target in _targets(kwargs, f"{section}."):
        locate(target, key)


def inherited_keys(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, list[str]]:
    """Keys a group file gave a section whose ``_target_`` the command line replaced, and which the new
    target does not take: ``{"data": ["root", "split_seed", …]}``.

    ``python -m lca_lab data._target_=mypkg.make_data`` keeps the keys of the default ``data=mnist`` file
    (root, split_seed …) that ``mypkg.make_data`` has never heard of; they are dropped (and said) rather
    than refused. Keys written on the command line (``data.x=…``, ``+data.x=…``) are always kept, so a
    mistyped one is still refused by :func:`check_parts`.
    """
    out: dict[str, list[str]] = {}
    for section in (*_SECTIONS, "test_data"):
        pattern = re.compile(rf"^[+~]{{0,2}}{section}\.([^.=]+)")
        written = {m.group(1) for o in overrides if (m := pattern.match(o))}
        node = cfg.get(section)
        if "_target_" not in written or not isinstance(node, Mapping):
            continue
        try:
            obj = locate(node.get("_target_"), f"{section}._target_")
        except ConfigError:
            continue  # check_parts says it in one line
        sig = _signature(obj)
        if sig is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            continue
        drop = [k for k in _hydra_keys(node) if k not in written and k not in sig.parameters]
        if drop:
            out[section] = drop
    return out


def _check_layer_momentum(cfg: Mapping[str, Any], opt_cls: Callable[..., Any], target: str) -> None:
    sig = _signature(opt_cls)
    if sig is None or "momentum" in sig.parameters or "betas" in sig.parameters:
        return
    for name, entry in (cfg.get("layers") or {}).items():
        if isinstance(entry, Mapping) and (
            entry.get("momentum") is not None or entry.get("momentum_delay") is not None
        ):
            raise ConfigError(
                f"layers.{name}: {target} has neither momentum nor betas, so a per-layer momentum "
                "(momentum / momentum_delay) cannot be set; remove it or choose another opt"
            )


# ----------------------------------------------------------------------------------------------------------
# configs read back from files


def _targets(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` of a ``_target_`` in a nested config, keys dotted (``net._target_``)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if k == "_target_":
                yield key, v
            else:
                yield from _targets(v, key + ".")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _targets(v, f"{prefix[:-1]}[{i}].")


def check_targets(cfg: Mapping[str, Any], extra_patterns: Sequence[str] = (), source: Any = "") -> None:
    """Refuse a config read back from a file (``source``) when one of its ``_target_``\\ s is untrusted.

    Trusted: ``lca_lab.*``, ``torch.*``, ``torchvision.*`` (less a few that load or run code named by
    their arguments, such as ``torch.hub.*`` and ``torch.load``) and the fnmatch patterns of
    ``extra_patterns`` — the reader's ``allow_targets``. The config's own ``allow_targets`` is *not* used:
    a file cannot vouch for itself. Raises ``ConfigError``, one line: ``refusing net._target_=mypkg.Net
    from <file>: not in the allowlist; add allow_targets=[mypkg.*] if you trust it``.
    """
    extra = [str(p) for p in (extra_patterns or ())]
    for key, target in _targets(cfg):
        if target is None:
            continue  # e.g. logger=none
        t = str(target)
        if any(fnmatch.fnmatchcase(t, p) for p in extra):
            continue
        if not any(fnmatch.fnmatchcase(t, p) for p in REFUSED_TARGETS) and any(
            fnmatch.fnmatchcase(t, p) for p in ALLOWED_TARGETS
        ):
            continue
        suggestion = t if any(fnmatch.fnmatchcase(t, p) for p in ALLOWED_TARGETS) else t.split(".")[0] + ".*"
        where = f" from {source}" if source else ""
        raise ConfigError(
            f"refusing {key}={t}{where}: not in the allowlist; "
            f"add allow_targets=[{suggestion}] if you trust it"
        )


_OLD_OPTIMIZERS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "rmsprop": "torch.optim.RMSprop"}


def upgrade_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored run config in today's shape: ``_target_``\\ s instead of names.

    Run files written before parts were built from targets store ``net: {name: fc, lr: {...}, ...}``,
    ``data: {name: mnist, ...}``, ``opt: {name: sgd, lr: 0.1, ...}`` (the learning rate already resolved)
    and no ``loss``. They map to ``lca_lab.nets.<name>`` (less the ``lr`` table), ``lca_lab.data.<name>``,
    ``torch.optim.SGD | Adam | RMSprop`` (Adam's unused ``momentum`` key dropped) and cross-entropy, so
    the same net, data and loss are rebuilt. A config already in today's shape is returned unchanged.
    """
    out = copy.deepcopy(dict(cfg))
    net = out.get("net")
    if isinstance(net, Mapping) and "_target_" not in net and "name" in net:
        rest = {k: v for k, v in net.items() if k not in ("name", "lr")}
        out["net"] = {"_target_": f"lca_lab.nets.{net['name']}", **rest}
    data = out.get("data")
    if isinstance(data, Mapping) and "_target_" not in data and "name" in data:
        rest = {k: v for k, v in data.items() if k != "name"}
        out["data"] = {"_target_": f"lca_lab.data.{data['name']}", **rest}
    opt = out.get("opt")
    if isinstance(opt, Mapping) and "_target_" not in opt and "name" in opt:
        name = str(opt["name"])
        rest = {k: v for k, v in opt.items() if k != "name"}
        if name == "adam":
            rest.pop("momentum", None)  # per-layer momentum set beta1; opt.momentum was never used
        elif rest.get("momentum") is None:
            rest["momentum"] = 0.0
        out["opt"] = {"_target_": _OLD_OPTIMIZERS.get(name, name), **rest}
    if "loss" not in out:
        out["loss"] = dict(DEFAULT_LOSS)
    return out


# ----------------------------------------------------------------------------------------------------------
# building


def _call_data_target(node: Mapping[str, Any], key: str) -> Any:
    """A data target's result; a built-in's ``ValueError`` (a bad ``data.path`` …) is a ConfigError."""
    try:
        return _instantiate(node)
    except (ConfigError, DatasetUnavailableError):
        raise
    except (ValueError, OSError) as e:  # a missing file, a bad argument value: one line, exit 2
        if str(node["_target_"]).startswith("lca_lab."):
            raise ConfigError(" ".join(str(e).split())) from None
        raise ConfigError(
            f"{key}._target_={node['_target_']} failed: {type(e).__name__}: {' '.join(str(e).split())}"
        ) from None


def build_data(
    dcfg: Mapping[str, Any], device: str | torch.device = "cpu", *, stream: Any = "auto",
    workers: Any = "auto", test_cfg: Mapping[str, Any] | None = None,
) -> DataBundle:  # fmt: skip
    """The ``data`` section's target called with its keys, as a DataBundle on ``device``.

    The target may return a DataBundle, ``{"train": Dataset, "test": Dataset, …}`` or a Dataset
    (:mod:`lca_lab.splits`); ``test_cfg`` (the ``test_data`` section) builds a separate test Dataset.
    ``stream``/``workers``: ``lca.stream`` and ``lca.workers``.
    """
    from .splits import DataContractError, bundle_from

    result = _call_data_target(dcfg, "data")
    test = _call_data_target(test_cfg, "test_data") if test_cfg else None
    try:
        return bundle_from(result, str(dcfg["_target_"]), torch.device(device), stream, workers, test)
    except DataContractError as e:
        raise ConfigError(str(e)) from None


def build_model(ncfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    """The ``net`` section's target, with the data's ``input_shape`` / ``n_classes`` where it takes them."""
    obj = locate(ncfg["_target_"], "net._target_")
    sig = _signature(obj)
    params = sig.parameters if sig is not None else {}
    hook = {"input_shape": tuple(data.input_shape), "n_classes": int(data.n_classes)}
    extra = {k: v for k, v in hook.items() if k in params and k not in ncfg}
    try:
        model = _instantiate(ncfg, **extra)
    except ValueError as e:
        if callable(getattr(obj, "check_args", None)):  # a built-in factory's argument check
            raise ConfigError(f"net.{e}") from None
        raise
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"net._target_={ncfg['_target_']} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def build_loss(lcfg: Mapping[str, Any] | None) -> Callable[..., torch.Tensor]:
    """``loss_fn(logits, y, reduction="mean")`` from the ``loss`` section (a torch loss class taking
    ``reduction``), one module per reduction; the default is cross-entropy. ``torch.nn.CrossEntropyLoss``
    computes exactly ``F.cross_entropy`` (same call), so the numbers are those of the function."""
    node = dict(lcfg or DEFAULT_LOSS)
    modules: dict[str, nn.Module] = {r: _instantiate(node, reduction=r) for r in ("sum", "mean")}

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        m = modules.get(reduction)
        if m is None:
            m = modules[reduction] = _instantiate(node, reduction=reduction)
        return m(logits, y)

    loss_fn.config = node  # type: ignore[attr-defined]
    # Cross-entropy and NLL skip the -100 targets themselves; other losses get them masked out.
    loss_fn.ignore_index = getattr(modules["sum"], "ignore_index", None)  # type: ignore[attr-defined]
    return loss_fn


def probe_model(model: nn.Module, data: DataBundle, loss_fn: Callable[..., Any], target: str) -> None:
    """Run the model on the first two training examples (no gradient) and check what L needs: logits
    ``[..., C]`` (or ``.logits``) whose leading dims are the targets' shape, targets below C, and a finite
    loss. ``ConfigError`` in one line naming what to fix, before any compute is spent."""
    from .examples import call, logits_of, target_loss
    from .lca import lca_eval_mode

    ex = data.train
    x, y = ex.take(torch.arange(min(2, len(ex)), device=data.device if not ex.streamed else "cpu"))
    with torch.no_grad(), lca_eval_mode(model):
        try:
            out = call(model, x)
        except Exception as e:  # the user's forward on the user's data: one line, not a traceback
            raise ConfigError(
                f"net._target_={target} failed on the first training examples ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); check that the net takes the data's inputs"
            ) from None
        try:
            logits = logits_of(out)
        except TypeError as e:
            raise ConfigError(
                f"net._target_={target}: {e}; return logits [..., C] or an object with .logits"
            ) from None
        if tuple(logits.shape[:-1]) != tuple(y.shape):
            raise ConfigError(
                f"the targets of data._target_={data.source} have shape {tuple(y.shape[1:])} per example but "
                f"net._target_={target} gives logits {tuple(logits.shape[1:])}: targets must match the "
                "logits' leading dims (one class index per example, or one per token)"
            )
        C = int(logits.shape[-1])
        if data.n_classes > C:
            raise ConfigError(
                f"the data has {data.n_classes} classes but net._target_={target} gives {C} logits per "
                "target; give the net as many outputs as classes"
            )
        loss = target_loss(loss_fn, out, y, "sum", getattr(loss_fn, "ignore_index", None) != -100)
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss of net._target_={target} on the first examples is {float(loss)}")


@dataclass
class Parts:
    """What :func:`build_parts` built for a run (everything on the run's device)."""

    data: DataBundle
    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]  # loss_fn(logits, y, reduction="mean" | "sum" | "none")
    groups: list[tuple[str, list[str]]]  # nets.layer_groups(model)
    plans: list[LayerPlan] | None  # the layers overrides per layer (None without an optimizer)
    optimizer: torch.optim.Optimizer | None
    label: str  # short name of the net for progress bars (the target's last component)


def build_parts(
    cfg: Mapping[str, Any],
    device: torch.device,
    *,
    optimizer: bool = True,
    warn: Callable[[str], Any] = print,
) -> Parts:
    """Data (moved to ``device``), model (seeded with ``cfg["seed"]`` just before it is built), loss,
    layer groups and, with ``optimizer=True``, the layer plans and the optimizer of a run config.

    Warnings of the data target (the offline MNIST fallback) are passed to ``warn`` as one line each.
    Call :func:`check_parts` first; errors the config can fix are raised as ``ConfigError``.
    """
    lcfg = cfg.get("lca") or {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_data(
            cfg["data"], device, stream=lcfg.get("stream", "auto"), workers=lcfg.get("workers", "auto"),
            test_cfg=cfg.get("test_data"),
        )  # fmt: skip
    for w in caught:
        warn(f"WARNING: {w.message}")
    torch.manual_seed(int(cfg.get("seed", 0)))  # init does not depend on how much RNG data loading used
    model = build_model(cfg["net"], data).to(device)
    loss_fn = build_loss(cfg.get("loss"))
    probe_model(model, data, loss_fn, str(cfg["net"]["_target_"]))
    try:
        groups = layer_groups(model)  # the model's own lca_layers() where it has them
    except ValueError as e:
        raise ConfigError(f"net._target_={cfg['net']['_target_']}: {' '.join(str(e).split())}") from None
    plans = opt = None
    if optimizer:
        try:
            plans = plan_layers(groups, cfg.get("layers") or {})
        except ValueError as e:
            # One line: the valid layers as "index/negative index name".
            first = str(e).splitlines()[0].split(" Valid layers")[0]
            valid = ", ".join(f"{i}/{i - len(groups)} {name}" for i, (name, _) in enumerate(groups))
            raise ConfigError(f"{first} Valid layers: {valid}" if "\n" in str(e) else str(e)) from None
        try:
            opt = build_optimizer(model, groups, cfg["opt"], plans)
        except ValueError as e:  # e.g. a per-layer momentum for an optimizer without one
            raise ConfigError(str(e)) from None
    label = str(cfg["net"]["_target_"]).rpartition(".")[2]
    return Parts(data, model, loss_fn, groups, plans, opt, label)
