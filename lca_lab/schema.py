"""The typed config: what each key of ``python -m lca_lab`` and ``python -m lca_lab.recompute`` holds.

Dataclasses (OmegaConf structured configs), registered with Hydra's ConfigStore as ``lca_lab_schema``
(the run, ``conf/config.yaml``) and ``lca_lab_recompute_schema`` (``conf/recompute.yaml``). Their defaults
are the shipped ones (``conf/``). :func:`lca_lab.config.validate` checks a composed config against them
(types, choices, missing and unknown keys) and adds the range rules and the rules between keys, so that a
bad value fails in one line before any data is loaded. The values a run receives stay plain YAML types
(strings for the choices below, not Enum members): the run file's ``config`` text reads as before.

``data``, ``net``, ``opt``, ``loss`` and ``layers`` are open mappings: keyword arguments of a
``_target_`` (or per-layer overrides), checked by the part that takes them.

A key marked ``optional`` (field metadata) may be left out of a config; every other key must be there.
"""

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

__all__ = [
    "AUTO",
    "CheckpointConfig",
    "LCAConfig",
    "LoggerConfig",
    "LoggerMode",
    "Method",
    "Precision",
    "RECOMPUTE_LCA_KEYS",
    "RecomputeConfig",
    "RecomputeLCAConfig",
    "RunConfig",
    "StoreConfig",
    "SWITCH_KEYS",
    "Switch",
]


class Method(str, Enum):
    """``lca.method``: the path integral (see ``lca_lab.lca.METHODS``)."""

    rk4 = "rk4"  # Simpson/RK4 with adaptive refinement (the paper's method)
    trapezoid = "trapezoid"  # 1 pass/iteration where within the tolerance, else Simpson
    first_order = "first_order"  # gradient at θ_t only: cheap, biased


class Precision(str, Enum):
    """``lca.precision``: float32 matmuls/convolutions exact (fp32) or on tensor cores (tf32, GPU)."""

    fp32 = "fp32"
    tf32 = "tf32"


class LoggerMode(str, Enum):
    """``logger.mode`` of W&B: auto = online with credentials, else offline."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


AUTO = "auto"
# auto | true | false. A string may only be "auto" (checked by lca_lab.config); OmegaConf's unions hold
# primitive types only, so YAML's true/false stay booleans and auto a string.
Switch = bool | str
SWITCH_KEYS = ("channels_last", "cuda_graph", "cudnn_benchmark", "compile")


def _optional(default: Any = None, *, factory: Any = None) -> Any:
    """A key that a config may leave out (the code's default then applies: the one given here)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"optional": True})
    return field(default=default, metadata={"optional": True})


@dataclass
class LCAConfig:
    """``lca``: conf/lca/rk4.yaml and the files built on it."""

    enabled: bool = True
    method: Method = Method.rk4
    adaptive: bool = True
    tolerance: float = 1.0e-3  # nats per iteration, > 0
    max_splits: int = 32  # power of two ≥ 2
    chunk_size: int | str = AUTO  # auto or an integer ≥ 1
    precision: Precision = Precision.fp32
    channels_last: Switch = AUTO
    cuda_graph: Switch = AUTO
    cudnn_benchmark: Switch = AUTO
    compile: Switch = AUTO
    window: list[int] | None = None  # [start, stop)
    per_class: bool = False
    test: bool = False
    # How L's passes read the data: auto (cached on the device when it fits) | true (streamed from the
    # Dataset) | false (cached); and the DataLoader workers of streamed passes (auto or an integer ≥ 0).
    stream: Switch = _optional(AUTO)
    workers: int | str = _optional(AUTO)
    # LCA from a random subset of the training split, with standard errors (lca_lab.estimate,
    # docs/estimates.md): exact | subset; the subset's size (a fraction in (0, 1] or a count of examples);
    # one subset for the whole run instead of a fresh draw per iteration; the draws' seed (null: seed).
    estimate: str = _optional("exact")
    subset: float | int = _optional(0.1)
    subset_fixed: bool = _optional(False)
    subset_seed: int | None = _optional(None)


@dataclass
class StoreConfig:
    """``store``: what the run file holds and how it is written."""

    per_param: Switch = AUTO  # lca/param [T, K]; auto: when the run file fits max_gb (lca_lab.store.sizing)
    trajectory: bool = False
    flush_every: int = 50  # ≥ 1
    max_gb: float = 20  # > 0


@dataclass
class CheckpointConfig:
    """``checkpoint``: when checkpoint.pt is written."""

    enabled: bool = True
    every: int | None = None  # ≥ 1 iterations, or null
    seconds: float | None = 600  # > 0 seconds, or null


@dataclass
class LoggerConfig:
    """``logger``: conf/logger/wandb.yaml and conf/logger/none.yaml (which holds only its name/target).

    ``_target_`` (and ``_partial_``) build the tracker with ``hydra.utils.instantiate``; the other keys
    are W&B settings.
    """

    _target_: str | None = _optional()
    _partial_: bool = _optional(False)
    name: str | None = _optional("wandb")
    mode: LoggerMode = _optional(LoggerMode.auto)
    project: str = _optional("lca_lab")
    entity: str | None = _optional()
    group: str | None = _optional()
    job_type: str = _optional("train")
    tags: list[str] = _optional(factory=list)
    dir: str | None = _optional()
    init_timeout: float = _optional(30)  # > 0 seconds
    log_every: int = _optional(50)  # ≥ 1
    images: bool = _optional(True)
    artifact_max_mb: float = _optional(100)  # ≥ 0


@dataclass
class RunConfig:
    """The top level of ``python -m lca_lab`` (conf/config.yaml)."""

    seed: int = 0  # ≥ 0
    epochs: int = 5  # ≥ 1
    batch_size: int = 250  # ≥ 1
    device: str = AUTO  # auto | cpu | cuda | cuda:N
    eval_every: int = 50  # ≥ 1
    deterministic: bool = False
    figures: bool = True
    resume: bool = False
    allow_targets: list[str] = _optional(factory=list)  # fnmatch patterns of trusted _target_s
    dist: Switch = _optional(AUTO)  # auto: one run over the ranks of a torchrun/SLURM launch; false: never
    dist_timeout: float = _optional(300)  # > 0 seconds: a rank that dies or hangs ends the run after this
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    lca: LCAConfig = field(default_factory=LCAConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: dict[str, Any] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)
    opt: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] | None = _optional()
    test_data: dict[str, Any] | None = _optional()  # a test Dataset when data gives only the train split
    layers: dict[str, Any] = field(default_factory=dict)


# The lca keys a recompute may set (recompute.ENGINE_KEYS): the run's own types, each optional (null: the
# training run's value), plus batch_points, a recompute-only setting.
RECOMPUTE_LCA_KEYS = (
    "method", "tolerance", "max_splits", "adaptive", "chunk_size", "per_class", "test", "batch_points",
    "precision", "cuda_graph", "cudnn_benchmark", "compile", "estimate", "subset", "subset_fixed",
    "subset_seed",
)  # fmt: skip
_LCA_TYPES = {f.name: f.type for f in fields(LCAConfig)}
RecomputeLCAConfig = make_dataclass(
    "RecomputeLCAConfig",
    [
        (k, (_LCA_TYPES[k] if k in _LCA_TYPES else int) | None, field(default=None))
        for k in RECOMPUTE_LCA_KEYS
    ],
)
RecomputeLCAConfig.__module__ = __name__
RecomputeLCAConfig.__doc__ = (
    "``lca`` of a recompute: overrides of the training run's lca.* (null: the run's value); "
    "``batch_points`` ≥ 1: path points evaluated together."
)


@dataclass
class RecomputeConfig:
    """The top level of ``python -m lca_lab.recompute`` (conf/recompute.yaml)."""

    run_dir: str | None = None  # the training run's directory or run file (required in practice)
    shard: int = 0  # 0..num_shards-1
    num_shards: int | None = None  # ≥ 1, or null
    merge: bool = False
    out_dir: str | None = None
    device: str = AUTO  # auto | cpu | cuda | cuda:N
    per_param: bool | None = None
    flush_every: int = 50  # ≥ 1
    allow_targets: list[str] = _optional(factory=list)
    lca: RecomputeLCAConfig = field(default_factory=RecomputeLCAConfig)  # type: ignore[valid-type]


def is_optional_key(f) -> bool:
    """Whether a config may leave out the key of dataclass field ``f``."""
    return bool(f.metadata.get("optional"))


def default_of(f) -> Any:
    """The default value of a dataclass field (MISSING when it has none)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


_cs = ConfigStore.instance()
_cs.store(name="lca_lab_schema", node=RunConfig)
_cs.store(name="lca_lab_recompute_schema", node=RecomputeConfig)
