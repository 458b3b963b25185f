"""Networks of the LCA paper and the grouping of their parameters into "layers".

Every image factory takes the input shape ``(C, H, W)`` and the class count from the data, so each net
runs on MNIST-shaped ``[B, 1, 28, 28]`` and CIFAR-shaped ``[B, 3, 32, 32]`` batches and returns
logits ``[B, n_classes]``. :func:`gpt` takes the vocabulary size as ``n_classes`` and the window
``(T,)`` as ``input_shape`` and maps token indices ``[B, T]`` to logits ``[B, T, n_classes]``.

Conventions that other modules rely on:

* Submodules are registered in forward order (input -> output). :func:`layer_groups` walks
  ``named_modules()`` and attaches a BatchNorm to the most recent Conv/Linear, so the registration
  order *is* the layer structure.
* Initialisation (He-normal, fan-in, ReLU gain for every conv/linear weight; zero biases; BN weight 1,
  bias 0) draws only from the global torch RNG, so ``torch.manual_seed(s)`` before a factory
  (:func:`fc`, :func:`lenet`, :func:`allcnn`, :func:`resnet20`, :func:`vgg`) fixes the initial weights.
* A model may name its layers itself with a method ``lca_layers()`` (checked by :func:`layer_groups`);
  :func:`gpt` (the transformer of :mod:`lca_lab.transformer`) does, and so can a user's own model.
* Module paths are fixed by the code below, so layer names (``"conv1"``, ``"layer2.0.shortcut.conv"``,
  ``"fc"`` ...) are the same for every instance of a net type.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lca_lab.transformer import GPT

__all__ = [
    "fc",
    "lenet",
    "allcnn",
    "resnet20",
    "vgg",
    "gpt",
    "layer_groups",
    "param_layer_index",
    "entry_layer_index",
    "resolve_layers",
    "init_weights",
]

InputShape = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# initialisation and helpers
# --------------------------------------------------------------------------------------------------


def init_weights(model: nn.Module) -> nn.Module:
    """He-normal init of every conv/linear weight, zero biases, BN weight 1 / bias 0 (in place).

    Walks ``model.modules()`` in registration order and draws only from the global torch RNG, so the
    result depends only on the seed and the architecture.
    """
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if m.track_running_stats:
                m.reset_running_stats()
    return model


def _ch(base: int, width: float) -> int:
    """Channel count ``base * width`` rounded, at least 1 (so tiny test widths stay valid)."""
    return max(1, int(round(base * width)))


@torch.no_grad()
def _flat_size(features: nn.Module, input_shape: InputShape) -> int:
    """Number of features after ``features`` for one input of shape ``(C, H, W)``.

    A dummy forward on zeros (no RNG use) is more robust than conv/pool arithmetic, e.g. with
    ``ceil_mode`` pooling.
    """
    was_training = features.training
    features.eval()  # keep BN running stats untouched by the dummy pass
    out = features(torch.zeros(1, *input_shape))
    features.train(was_training)
    return int(out[0].numel())


# --------------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------------


def _build_fc(input_shape: InputShape, n_classes: int, hidden: Sequence[int] = (100, 50)) -> nn.Module:
    """MNIST-FC: flatten, ``C*H*W`` -> 100 -> 50 -> n_classes with ReLU.

    Layers: ``fc1``, ``fc2``, ``fc3`` (one per linear, ``fc{k}`` numbered from the input).
    """
    c, h, w = input_shape
    sizes = [c * h * w, *hidden, n_classes]
    mods: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for k in range(len(sizes) - 1):
        mods.append((f"fc{k + 1}", nn.Linear(sizes[k], sizes[k + 1])))
        if k < len(sizes) - 2:
            mods.append((f"relu{k + 1}", nn.ReLU()))
    return nn.Sequential(OrderedDict(mods))


class LeNet(nn.Module):
    """The LCA paper's modified LeNet.

    conv5x5(20) ReLU maxpool2 -> conv5x5(40) ReLU maxpool2 -> flatten -> linear 400 ReLU ->
    dropout(p) -> linear n_classes.  With ``padding=0`` a [B,1,28,28] input gives [B,40,4,4]
    features (640 after flattening), [B,3,32,32] gives [B,40,5,5] (1000).

    Layers: ``conv1``, ``conv2``, ``fc1``, ``fc2``.
    """

    def __init__(self, input_shape: InputShape, n_classes: int, dropout: float = 0.5, padding: int = 0):
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, 20, 5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 40, 5, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        n_flat = _flat_size(
            nn.Sequential(self.conv1, self.relu1, self.pool1, self.conv2, self.relu2, self.pool2),
            input_shape,
        )
        self.fc1 = nn.Linear(n_flat, 400)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(400, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, n_classes]."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc2(x)


def _build_allcnn(input_shape: InputShape, n_classes: int, width: float = 1.0) -> nn.Module:
    """All-CNN-C (Springenberg et al. 2014) with BatchNorm, as used for CIFAR-AllCNN.

    3x3 convs 96, 96, 96/stride 2, 192, 192, 192/stride 2, 3x3 192, 1x1 192, each followed by BN and
    ReLU; then a 1x1 conv to ``n_classes`` (bias, no BN, no ReLU: its output averaged over space *is*
    the logits) and global average pooling. All 3x3 convs use padding 1, as in the LCA authors' code
    (the original paper's 3x3 192 conv is "valid"); spatial size 32 -> 16 -> 8 (28 -> 14 -> 7).
    Convs followed by BN have ``bias=False`` because BN's shift makes a conv bias redundant (a
    parameter with exactly zero gradient would only add zero-LCA entries).  No dropout (the
    original's dropout after the strided convs is replaced by BN).  ``width`` scales all hidden
    channel counts.

    Layers: ``features.conv1`` ... ``features.conv8`` (each with its ``features.bn{k}``), then
    ``features.conv9`` (the classifier conv).
    """
    spec = [  # (channels, kernel, stride)
        (96, 3, 1), (96, 3, 1), (96, 3, 2),
        (192, 3, 1), (192, 3, 1), (192, 3, 2),
        (192, 3, 1), (192, 1, 1),
    ]  # fmt: skip
    mods: list[tuple[str, nn.Module]] = []
    c_in = input_shape[0]
    for k, (c, ksz, stride) in enumerate(spec, start=1):
        c_out = _ch(c, width)
        mods += [
            (f"conv{k}", nn.Conv2d(c_in, c_out, ksz, stride=stride, padding=ksz // 2, bias=False)),
            (f"bn{k}", nn.BatchNorm2d(c_out)),
            (f"relu{k}", nn.ReLU()),
        ]
        c_in = c_out
    mods.append((f"conv{len(spec) + 1}", nn.Conv2d(c_in, n_classes, 1)))
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(OrderedDict(mods)),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
        )
    )


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is the identity when shape is unchanged, otherwise a 1x1 conv (stride ``stride``,
    no bias) + BN ("option B"), registered after ``bn2`` as ``shortcut.conv`` / ``shortcut.bn`` so it
    becomes its own layer.
    [B, c_in, H, W] -> [B, c_out, H/stride, W/stride].
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(c_out),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, c_in, H, W] -> [B, c_out, H', W']."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2015, section 4.2) with 1x1-conv projection shortcuts.

    conv3x3(w)-BN-ReLU, three stages of three :class:`BasicBlock` with w, 2w, 4w channels (stride 2
    at the start of stages 2 and 3), global average pool, linear -> n_classes.  ``width`` = w
    (default 16).

    22 layers: ``conv1`` (+``bn1``), ``layer{s}.{b}.conv1``/``conv2`` (+BN) for s in 1..3, b in 0..2,
    ``layer2.0.shortcut.conv`` and ``layer3.0.shortcut.conv`` (+BN), and ``fc``.
    """

    def __init__(self, input_shape: InputShape, n_classes: int, width: int = 16):
        super().__init__()
        w = int(width)
        self.conv1 = nn.Conv2d(input_shape[0], w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(w, w, 1)
        self.layer2 = self._stage(w, 2 * w, 2)
        self.layer3 = self._stage(2 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, n_classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, stride: int, n_blocks: int = 3) -> nn.Sequential:
        blocks = [BasicBlock(c_in, c_out, stride)]
        blocks += [BasicBlock(c_out, c_out, 1) for _ in range(n_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, n_classes]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


_VGG_HALF_11 = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")


def _build_vgg(
    input_shape: InputShape, n_classes: int, width: float = 1.0, batchnorm: bool = False, hidden: int = 256
) -> nn.Module:
    """Half-width VGG-11: convs 32,M,64,M,128,128,M,256,256,M,256,256,M, then 256-ReLU-n_classes.

    3x3 convs with padding 1 and ReLU (BN after each conv if ``batchnorm``; the conv then has no
    bias); ``MaxPool2d(2, ceil_mode=True)`` so 28x28 inputs work (28->14->7->4->2->1; 32 -> 1 too).
    ``width`` scales every conv channel count and the hidden linear size.

    Layers: ``features.conv1`` ... ``features.conv8``, ``classifier.fc1``, ``classifier.fc2``.
    """
    mods: list[tuple[str, nn.Module]] = []
    c_in, n_conv, n_pool = input_shape[0], 0, 0
    for v in _VGG_HALF_11:
        if v == "M":
            n_pool += 1
            mods.append((f"pool{n_pool}", nn.MaxPool2d(2, ceil_mode=True)))
            continue
        n_conv += 1
        c_out = _ch(int(v), width)
        mods.append((f"conv{n_conv}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)))
        if batchnorm:
            mods.append((f"bn{n_conv}", nn.BatchNorm2d(c_out)))
        mods.append((f"relu{n_conv}", nn.ReLU()))
        c_in = c_out
    features = nn.Sequential(OrderedDict(mods))
    n_flat = _flat_size(features, input_shape)
    h = _ch(hidden, width)
    classifier = nn.Sequential(
        OrderedDict(fc1=nn.Linear(n_flat, h), relu=nn.ReLU(), fc2=nn.Linear(h, n_classes))
    )
    return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(), classifier=classifier))


# --------------------------------------------------------------------------------------------------
# the built-in nets as config targets (conf/net/*.yaml: ``_target_: lca_lab.nets.<name>``)
# --------------------------------------------------------------------------------------------------
#
# Each factory takes the data's ``input_shape`` (C, H, W) and ``n_classes`` (lca_lab passes them because
# the signature names them) plus its options, checks its arguments (``ValueError`` naming the argument),
# builds the net and He-initialises it (:func:`init_weights`): ``torch.manual_seed`` before the call fixes
# the weights. ``<factory>.check_args(**options)`` runs the option checks alone, without building
# anything; ``lca_lab.parts.check_parts`` calls it before any data is loaded.


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_shape(input_shape: Sequence[int], n_classes: int) -> tuple[InputShape, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive integers, got {tuple(input_shape)!r}")
    if not _is_int(n_classes) or n_classes < 1:
        raise ValueError(f"n_classes must be an integer ≥ 1, got {n_classes!r}")
    return tuple(int(s) for s in shape), int(n_classes)  # type: ignore[return-value]


def _positive_width(width: object) -> None:
    if not _is_number(width) or not width > 0:
        raise ValueError(f"width must be a number > 0, got {width!r}")


def _with_checks(
    check: Callable[..., None],
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Attach ``check`` as the factory's ``check_args`` (the options' checks without building the net)."""

    def attach(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        factory.check_args = check  # type: ignore[attr-defined]
        return factory

    return attach


def _check_fc(hidden: Sequence[int] = (100, 50)) -> None:
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ValueError(f"hidden must be a list of layer widths, e.g. [100, 50], got {hidden!r}")
    if not all(_is_int(h) and h > 0 for h in hidden):
        raise ValueError(f"hidden must hold integers > 0, got {list(hidden)!r}")


@_with_checks(_check_fc)
def fc(input_shape: InputShape, n_classes: int, hidden: Sequence[int] = (100, 50)) -> nn.Module:
    """MNIST-FC (paper): flatten, ``C*H*W`` → ``hidden`` … → n_classes with ReLU, He-initialised.

    Layers: ``fc1``, ``fc2``, … (one per linear, numbered from the input).
    """
    _check_fc(hidden)
    shape, n = _check_shape(input_shape, n_classes)
    return init_weights(_build_fc(shape, n, [int(h) for h in hidden]))


def _check_lenet(dropout: float = 0.5, padding: int = 0) -> None:
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not _is_int(padding) or padding < 0:
        raise ValueError(f"padding must be an integer ≥ 0, got {padding!r}")


@_with_checks(_check_lenet)
def lenet(input_shape: InputShape, n_classes: int, dropout: float = 0.5, padding: int = 0) -> nn.Module:
    """The paper's modified LeNet (:class:`LeNet`), He-initialised; conf/net/lenet.yaml sets padding 2."""
    _check_lenet(dropout, padding)
    shape, n = _check_shape(input_shape, n_classes)
    return init_weights(LeNet(shape, n, dropout=dropout, padding=padding))


def _check_allcnn(width: float = 1.0) -> None:
    _positive_width(width)


@_with_checks(_check_allcnn)
def allcnn(input_shape: InputShape, n_classes: int, width: float = 1.0) -> nn.Module:
    """All-CNN-C with BatchNorm (paper: CIFAR-AllCNN), He-initialised; ``width`` scales the channels."""
    _check_allcnn(width)
    shape, n = _check_shape(input_shape, n_classes)
    return init_weights(_build_allcnn(shape, n, width))


def _check_resnet20(width: int = 16) -> None:
    if not _is_number(width) or width < 1 or int(width) != width:
        raise ValueError(f"width must be an integer ≥ 1 (base channel count), got {width!r}")


@_with_checks(_check_resnet20)
def resnet20(input_shape: InputShape, n_classes: int, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (:class:`ResNet20`, paper: CIFAR-ResNet), He-initialised; ``width`` base channels."""
    _check_resnet20(width)
    shape, n = _check_shape(input_shape, n_classes)
    return init_weights(ResNet20(shape, n, width=int(width)))


def _check_vgg(width: float = 1.0, batchnorm: bool = False, hidden: int = 256) -> None:
    _positive_width(width)
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be true or false, got {batchnorm!r}")
    if not _is_int(hidden) or hidden < 1:
        raise ValueError(f"hidden must be an integer ≥ 1, got {hidden!r}")


@_with_checks(_check_vgg)
def vgg(
    input_shape: InputShape, n_classes: int, width: float = 1.0, batchnorm: bool = False, hidden: int = 256
) -> nn.Module:
    """Half-width VGG-11 (see :func:`_build_vgg`), He-initialised."""
    _check_vgg(width, batchnorm, hidden)
    shape, n = _check_shape(input_shape, n_classes)
    return init_weights(_build_vgg(shape, n, width=width, batchnorm=batchnorm, hidden=hidden))


def _check_gpt(
    context: int | None = None,
    depth: int = 2,
    width: int = 64,
    heads: int = 4,
    dropout: float = 0.0,
    tie: bool = True,
) -> None:
    if context is not None and (not _is_int(context) or context < 1):
        raise ValueError(f"context must be an integer ≥ 1 or null (the data's window), got {context!r}")
    if not _is_int(depth) or depth < 1:
        raise ValueError(f"depth must be an integer ≥ 1 (number of blocks), got {depth!r}")
    if not _is_int(heads) or heads < 1:
        raise ValueError(f"heads must be an integer ≥ 1, got {heads!r}")
    if not _is_int(width) or width < 1 or width % heads:
        raise ValueError(f"width must be an integer ≥ 1 divisible by heads={heads!r}, got {width!r}")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(tie, bool):
        raise ValueError(f"tie must be true or false, got {tie!r}")


@_with_checks(_check_gpt)
def gpt(
    n_classes: int,
    input_shape: Sequence[int] | None = None,
    context: int | None = None,
    depth: int = 2,
    width: int = 64,
    heads: int = 4,
    dropout: float = 0.0,
    tie: bool = True,
) -> nn.Module:
    """A small decoder-only transformer (:class:`lca_lab.transformer.GPT`), GPT-2-initialised.

    Args:
        n_classes: vocabulary size (the data's class count: 256 for ``data=text``'s bytes).
        input_shape: shape of one example's inputs, ``(window,)`` (lca_lab passes it); its last entry is
            the sequence length.
        context: positions the model covers; None = the window. Shorter than the window is an error.
        depth, width, heads, dropout, tie: see :class:`~lca_lab.transformer.GPT`.

    Layers (:meth:`GPT.lca_layers`): ``embed``, ``block{i}.attn``, ``block{i}.mlp`` …, ``head``.
    """
    _check_gpt(context, depth, width, heads, dropout, tie)
    if not _is_int(n_classes) or n_classes < 1:
        raise ValueError(f"n_classes must be an integer ≥ 1 (the vocabulary size), got {n_classes!r}")
    window = None
    if input_shape is not None:
        shape = tuple(input_shape)
        if not shape or not all(_is_int(s) and s > 0 for s in shape):
            raise ValueError(f"input_shape must be (window,) of a positive integer, got {shape!r}")
        window = int(shape[-1])
    if context is None:
        if window is None:
            raise ValueError("context=null needs the data's window (input_shape): set net.context=<int>")
        context = window
    elif window is not None and context < window:
        raise ValueError(
            f"context={context} is shorter than the data's window of {window} tokens: "
            f"set net.context=null (the window) or ≥ {window}"
        )
    return GPT(int(n_classes), int(context), int(depth), int(width), int(heads), float(dropout), tie)


# --------------------------------------------------------------------------------------------------
# layer grouping
# --------------------------------------------------------------------------------------------------

_WEIGHT_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
_NORM_MODULES = (nn.modules.batchnorm._BatchNorm,)


def layer_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Group the trainable parameters of ``model`` into the paper's "layers".

    **A model's own layers.** A model with a callable ``lca_layers()`` method (any ``nn.Module``, e.g.
    :meth:`lca_lab.transformer.GPT.lca_layers`) defines its layers itself: it returns
    ``[(layer_name, [param_name, ...]), ...]`` with names as ``model.named_parameters()`` gives them, in
    the order the layers should have (input -> output). It may list frozen parameters (they are dropped,
    and a layer left empty disappears) and may name a tied tensor by any of its names, but every
    trainable tensor must be in exactly one layer, under a name the model has: anything else is a
    ``ValueError`` naming the problem. Parameters within a layer are put in ``named_parameters()``
    order and named canonically (a tied tensor by its first name).

    Otherwise these rules apply, while walking ``model.named_modules()`` (registration order):

    * each Conv*/Linear starts a layer named by its module path (e.g. ``"layer1.0.conv1"``), holding
      its weight and bias;
    * a BatchNorm's affine parameters join the layer of the most recent preceding Conv/Linear (the
      paper's Figure 4 convention); a BatchNorm with no preceding Conv/Linear gets its own layer;
    * any other trainable parameter gets one layer per owning module, named by the module path, or by
      the parameter name for parameters registered directly on ``model``.

    Parameter names are those of ``model.named_parameters()``; only parameters with
    ``requires_grad`` are included (a frozen tensor drops out of its layer, and a layer whose
    tensors are all frozen disappears, shifting later indices).  Shared parameters appear once, under
    their first name.  Layers are ordered by the first appearance of their parameters in
    ``named_parameters()`` order (input -> output for the nets built here).

    Returns:
        ``[(layer_name, [param_name, ...]), ...]``; every trainable parameter in exactly one layer.
    """
    hook = getattr(model, "lca_layers", None)
    if callable(hook):
        return _own_layers(model, hook())
    # Map each parameter object to its canonical (deduplicated) name, so shared parameters and the
    # exact naming of named_parameters() are respected.
    canonical: dict[int, str] = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    seen: set[int] = set()
    layer_of: dict[str, str] = {}  # param name -> layer name
    members: dict[str, list[str]] = {}  # layer name -> param names (insertion order)
    last_weight_layer: str | None = None

    def add(layer: str, pname: str) -> None:
        layer_of[pname] = layer
        members.setdefault(layer, []).append(pname)

    for mpath, module in model.named_modules():
        own = [
            (pn, p)
            for pn, p in module.named_parameters(recurse=False)
            if id(p) in canonical and id(p) not in seen
        ]
        if isinstance(module, _WEIGHT_MODULES):
            last_weight_layer = mpath
        for local, p in own:
            seen.add(id(p))
            pname = canonical[id(p)]
            if isinstance(module, _WEIGHT_MODULES):
                add(mpath, pname)
            elif isinstance(module, _NORM_MODULES) and last_weight_layer is not None:
                add(last_weight_layer, pname)
            elif mpath == "":
                add(local, pname)
            else:
                add(mpath, pname)

    # Order layers by first appearance in named_parameters() order, and parameters within a layer too.
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    rank = {n: i for i, n in enumerate(order)}
    groups: list[tuple[str, list[str]]] = []
    emitted: set[str] = set()
    for pname in order:
        layer = layer_of[pname]
        if layer not in emitted:
            emitted.add(layer)
            groups.append((layer, sorted(members[layer], key=rank.__getitem__)))
    return groups


def _own_layers(model: nn.Module, layers: object) -> list[tuple[str, list[str]]]:
    """Check a model's ``lca_layers()`` answer and put it in :func:`layer_groups`' form (see there)."""
    where = f"{type(model).__name__}.lca_layers()"
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
        raise ValueError(f"{where} must return a list of (layer name, [parameter names]), got {layers!r}")
    by_name = dict(model.named_parameters(remove_duplicate=False))  # every name, tied aliases included
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tensor's first name
    rank = {n: i for i, n in enumerate(canonical.values())}
    owner: dict[int, str] = {}  # tensor -> the layer that claimed it
    groups: list[tuple[str, list[str]]] = []
    seen_layers: set[str] = set()
    for entry in layers:
        if (
            isinstance(entry, (str, bytes))
            or not isinstance(entry, Sequence)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or isinstance(entry[1], (str, bytes))
            or not isinstance(entry[1], Sequence)
        ):
            raise ValueError(f"{where}: each entry must be (layer name, [parameter names]), got {entry!r}")
        layer, pnames = entry
        if not layer or layer in seen_layers:
            raise ValueError(f"{where}: layer names must be unique and non-empty, got {layer!r}")
        seen_layers.add(layer)
        if not pnames:
            raise ValueError(f"{where}: layer {layer!r} has no parameters; leave it out or give it some")
        kept = []
        for pname in pnames:
            p = by_name.get(pname) if isinstance(pname, str) else None
            if p is None:
                example = next(iter(canonical.values()), "")
                raise ValueError(
                    f"{where}: layer {layer!r} names {pname!r}, which is not a parameter of the model "
                    f"(names as model.named_parameters() gives them, e.g. {example!r})"
                )
            if id(p) in owner:
                alias = "" if canonical[id(p)] == pname else f" (the same tensor as {canonical[id(p)]!r})"
                raise ValueError(
                    f"{where}: {pname!r}{alias} is in layer {owner[id(p)]!r} and again in {layer!r}; "
                    "put each tensor in exactly one layer"
                )
            owner[id(p)] = layer
            if p.requires_grad:
                kept.append(canonical[id(p)])
        if kept:  # a layer whose tensors are all frozen disappears, as with the built-in rules
            groups.append((layer, sorted(kept, key=rank.__getitem__)))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{where} leaves out trainable parameters {shown}; put each in exactly one layer")
    return groups


def param_layer_index(model: nn.Module) -> list[int]:
    """Layer index (into :func:`layer_groups`) of each trainable parameter tensor.

    Returns:
        list of length K_tensors, in ``model.named_parameters()`` order (trainable only).
    """
    groups = layer_groups(model)
    index = {pname: li for li, (_, pnames) in enumerate(groups) for pname in pnames}
    return [index[n] for n, p in model.named_parameters() if p.requires_grad]


def entry_layer_index(model: nn.Module) -> torch.Tensor:
    """Layer index (into :func:`layer_groups`) of every entry of the flat vector of trainable parameters.

    Returns:
        [K] int64 on the CPU: each tensor's index of :func:`param_layer_index`, repeated over its entries,
        in ``model.named_parameters()`` order (the order of the flat θ that the LCA engine uses).
    """
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    return torch.repeat_interleave(
        torch.tensor(param_layer_index(model), dtype=torch.int64), torch.tensor(sizes)
    )


def resolve_layers(groups: Sequence[tuple[str, Sequence[str]]], selectors: Sequence[str | int]) -> list[int]:
    """Turn layer selectors into layer indices.

    Args:
        groups: output of :func:`layer_groups`.
        selectors: layer names, or ints / int-like strings (``"-1"``); negative ints count from the
            output (``-1`` = last layer). A single selector may be passed bare (``"fc"``, ``-1``).

    Returns:
        Layer indices in ``[0, n_layers)``, in selector order (duplicates kept).

    Raises:
        ValueError: unknown name or out-of-range index; the message lists every layer with its index.
    """
    names = [name for name, _ in groups]
    n = len(names)
    if isinstance(selectors, (str, int)):
        selectors = [selectors]

    def fail(sel: object, why: str) -> ValueError:
        listing = "\n".join(f"  {i:3d} ({i - n:4d})  {nm}" for i, nm in enumerate(names))
        return ValueError(f"{why}: {sel!r}. Valid layers (index (negative index) name):\n{listing}")

    out: list[int] = []
    for sel in selectors:
        if isinstance(sel, bool):  # bool is an int subclass; True as a layer index is surely a mistake
            raise fail(sel, "layer selector must be a name or an int")
        idx: int | None = None
        if isinstance(sel, int):
            idx = sel
        elif isinstance(sel, str):
            if sel in names:  # names win over int parsing (a layer could be named "0" in a Sequential)
                out.append(names.index(sel))
                continue
            try:
                idx = int(sel.strip())
            except ValueError:
                raise fail(sel, "unknown layer name") from None
        else:
            raise fail(sel, "layer selector must be a name or an int")
        if not -n <= idx < n:
            raise fail(sel, f"layer index out of range for {n} layers")
        out.append(idx % n)
    return out
