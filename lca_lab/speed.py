"""How L's passes run: one decision for train, recompute and bench.

Four switches change how fast the full-data passes of L(θ) run, not what they compute (kernels may
differ, so their values only to float rounding): ``lca.channels_last`` (NHWC layout), ``lca.cuda_graph``
(replay a pass as one CUDA graph), ``lca.cudnn_benchmark`` (cuDNN's autotuner) and ``lca.compile``
(``torch.compile``). Each is ``auto``, ``true`` or ``false``. :func:`pass_settings` decides them for a
model on a device: an explicit ``true``/``false`` is taken as given (for experts, with the refusals of
:func:`check_settings`); ``auto`` takes what the benchmark measured fastest for that kind of net on that
device (README.md, "Benchmark"), and on the CPU everything off. ``lca.precision`` (fp32/tf32) is not
decided here: it changes the numbers, so it stays the user's explicit choice (it selects the rules).

The kinds of net (:func:`net_kind`): ``dense`` (no convolution: MNIST-FC and the like), ``conv``
(convolutions without BatchNorm: LeNet, All-CNN) and ``conv_bn`` (convolutions with BatchNorm:
ResNet-20, VGG with BatchNorm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .lca import has_batchnorm

SPEED_KEYS = ("channels_last", "cuda_graph", "cudnn_benchmark", "compile")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SpeedError(ConfigError):
    """An impossible combination of speed settings; the message names the key and the fix."""


@dataclass(frozen=True)
class PassSettings:
    """How L's passes run (the resolved switches) and in a few words why."""

    channels_last: bool
    cuda_graph: bool
    cudnn_benchmark: bool
    compile: bool
    reason: str = ""

    def engine_kwargs(self) -> dict[str, bool]:
        """The keyword arguments of :class:`lca_lab.lca.FullBatchLoss` for these settings."""
        return {k: getattr(self, k) for k in SPEED_KEYS}

    def attrs(self) -> dict[str, bool]:
        """The run file's attributes of the resolved settings (``lca_channels_last``, …)."""
        return {f"lca_{k}": getattr(self, k) for k in SPEED_KEYS}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def net_kind(model: nn.Module) -> str:
    """``dense`` (no convolution), ``conv`` (convolutions, no BatchNorm) or ``conv_bn``."""
    if not any(isinstance(m, _CONV_TYPES) for m in model.modules()):
        return "dense"
    return "conv_bn" if has_batchnorm(model) else "conv"


def _value(lca_cfg: Mapping[str, Any], key: str) -> bool | str:
    v = lca_cfg.get(key, "auto")
    if v is None or v == "auto":
        return "auto"
    if isinstance(v, bool):
        return v
    raise SpeedError(f"lca.{key} must be true or false (or auto), got {v!r}")


def check_settings(
    lca_cfg: Mapping[str, Any], device: torch.device | None = None, deterministic: bool = False
) -> dict[str, bool | str]:
    """The four switches as asked (``auto``/True/False), checked before any compute.

    Refused (:class:`SpeedError`, one line naming the fix): a value other than auto/true/false;
    ``compile=true`` with ``cuda_graph=true`` (not supported together); ``cudnn_benchmark=true`` with
    ``deterministic`` (the autotuner picks algorithms by timing them); ``cuda_graph=true`` on a device
    other than CUDA (when ``device`` is given).
    """
    asked = {k: _value(lca_cfg, k) for k in SPEED_KEYS}
    if asked["compile"] is True and asked["cuda_graph"] is True:
        raise SpeedError(
            "lca.compile=true and lca.cuda_graph=true together are not supported (not measured); "
            "set one of them to false"
        )
    if asked["cudnn_benchmark"] is True and deterministic:
        raise SpeedError(
            "lca.cudnn_benchmark=true chooses cuDNN algorithms by timing them, which deterministic=true "
            "rules out; set lca.cudnn_benchmark=false or deterministic=false"
        )
    if asked["cuda_graph"] is True and device is not None and device.type != "cuda":
        raise SpeedError(
            f"lca.cuda_graph=true records the full-data pass as a CUDA graph, but this run is on {device}; "
            "set lca.cuda_graph=false or run on a GPU (device=cuda)"
        )
    return asked


def pass_settings(
    model: nn.Module,
    device: torch.device,
    lca_cfg: Mapping[str, Any],
    deterministic: bool = False,
    *,
    batched: bool = False,
) -> PassSettings:
    """Decide how L's passes run for ``model`` on ``device`` (see the module's docstring).

    Args:
        model: the net (only its kinds of modules are read).
        device: where the passes run.
        lca_cfg: the ``lca`` config: ``channels_last``, ``cuda_graph``, ``cudnn_benchmark``, ``compile``
            (auto/true/false, missing = auto) and ``precision`` (fp32/tf32, missing = fp32).
        deterministic: the run asks for reproducible algorithms: ``auto`` then picks neither the
            autotuner nor ``torch.compile``, and ``cudnn_benchmark=true`` is refused.
        batched: the passes evaluate several path points together with ``torch.func.vmap`` (a
            recompute's batched points), which a CUDA graph of one point's pass would forgo.

    Raises :class:`SpeedError` for what :func:`check_settings` refuses without a device; ``cuda_graph``
    off a GPU resolves to false (a run refuses it earlier, with :func:`check_settings` given the device).
    """
    asked = check_settings(lca_cfg, None, deterministic)
    kind = net_kind(model)
    conv2d = any(isinstance(m, nn.Conv2d) for m in model.modules())
    fp32 = str(lca_cfg.get("precision") or "fp32") == "fp32"
    cuda = device.type == "cuda"
    why: list[str] = []

    def auto(key: str) -> bool:
        return asked[key] == "auto"

    # The rules; each rests on the README's measurements ("Benchmark", runs A–G on an H200), and on the
    # CPU nothing is switched on: there are no CUDA graphs or cuDNN, and torch.compile's CPU backend was
    # measured only as a cost (15–100 s of compiling for small nets on 2 cores, a C++ compiler needed).
    compile_ = asked["compile"] if not auto("compile") else False
    graph_asked = asked["cuda_graph"] is True
    if auto("compile") and cuda and kind != "dense" and not graph_asked and not deterministic:
        # Conv nets on a GPU: compiled passes fuse BatchNorm/ReLU into fewer kernels, the same numbers to
        # rounding (run F, "lca.compile on the other conv nets": LeNet −17 %, All-CNN −2.3 % per fp32
        # RK4 iteration; the pipelined-loop run: ResNet-20 −5 % fp32, −12 % TF32). Not measured on FC
        # (CUDA graphs are its lever, below) nor under deterministic algorithms.
        compile_ = True
        why.append("compile: conv net on a GPU (runs B, F: −2 to −17 % per iteration)")
    graph = asked["cuda_graph"] is True and cuda  # CUDA graphs exist on CUDA only
    if auto("cuda_graph") and cuda and kind == "dense" and not compile_ and not batched:
        # Small launch-bound nets: one launch per pass (runs B, D, F: MNIST-FC engine loop 1.98–3.48 ms
        # per RK4 iteration graphed against 4.0–5.2 ms eager, the same numbers). Conv nets gain 1–2 %
        # (run G, 4.: LeNet −1.6 %, ResNet-20 −1.1 %) against compile's 2–17 %, and compile and graphs
        # do not combine. Batched points (vmap) beat graphed single points in a recompute (FC: 1.47–1.52
        # against 2.13–2.15 ms per RK4 step, the 2026-11-27 and pipelined runs' recomp column).
        graph = True
        why.append("cuda_graph: launch-bound net without convolutions on a GPU (runs B, D, F: −9 to −60 %)")
    bm = asked["cudnn_benchmark"] if not auto("cudnn_benchmark") else False
    if auto("cudnn_benchmark") and cuda and kind == "conv_bn" and fp32 and not deterministic:
        # ResNet-20 fp32 (run G, 1. and 3.): the autotuner's algorithms make a channels-last pass 15 %
        # faster (915.77 against 1073 ms) and, with NCHW and compile, give the fastest fp32 pass (796 ms;
        # an RK4 iteration 1.59 s against 2.16 s for the old defaults). Not measured on LeNet/All-CNN
        # ("Still open on the GPU") nor in TF32; never under deterministic algorithms (it times them).
        bm = True
        why.append("cudnn_benchmark: fp32 BatchNorm conv net on a GPU (run G: −15 % per pass)")
    if auto("channels_last"):
        # Eager conv nets on a GPU run faster in NHWC: cuDNN's NCHW BatchNorm is slow (run G, 1.: a
        # ResNet-20 fp32 pass 1888.8 ms NCHW against 1078.2 ms channels-last, 1558.9 ms NCHW with the
        # autotuner). Compiled (BatchNorm in Triton) and autotuned, fp32 convolutions run as NCHW
        # kernels without cuDNN's transposes: NCHW 796.2 ms against 860.33 ms channels-last (run G, 1.
        # and 3.) — measured on ResNet-20 in fp32 only, so only there NCHW.
        nchw = kind == "conv_bn" and fp32 and compile_ and bm
        cl = cuda and conv2d and not nchw
        if cl or nchw:
            why.append(
                "NCHW: compiled, autotuned fp32 BatchNorm conv net (run G: 796 ms per ResNet-20 pass)"
                if nchw
                else "channels_last: conv net on a GPU (run G: NCHW 1.75x slower eager)"
            )
    else:
        cl = bool(asked["channels_last"]) and conv2d  # the NHWC layout exists for 4-d tensors only
    if not cuda and not why:
        why.append(f"{device.type}: nothing to switch on (auto)")
    explicit = [f"{k}={str(v).lower()}" for k, v in asked.items() if v != "auto"]
    if explicit:
        why.append("as set: " + ", ".join(explicit))
    reason = f"{kind} net on {device.type}: " + "; ".join(why)
    return PassSettings(bool(cl), bool(graph), bool(bm), bool(compile_), reason)
