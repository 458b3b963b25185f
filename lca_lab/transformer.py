"""A small decoder-only transformer (GPT-2 style) written for LCA on language models.

``GPT`` maps token indices ``idx`` [B, T] (int64 in ``[0, vocab)``) to next-token logits [B, T, vocab].
Architecture: token + learned position embeddings, ``depth`` pre-LayerNorm blocks (causal multi-head
self-attention, then an MLP ``width -> 4*width -> width`` with GELU, each added to the residual stream),
a final LayerNorm and a linear head without bias whose weight is the token embedding's (``tie=True``).

Written for ``torch.func``: the model has no buffers, no in-place updates of its inputs and no
data-dependent control flow, and the attention is a masked softmax (not a fused kernel), so
``functional_call``, ``grad`` and ``vmap`` over the parameters all work, in float32 and float64.
Dropout layers exist only where the rate is > 0 (a ``Dropout`` in training mode draws random numbers,
which ``vmap`` refuses unless told how; with the default 0.0 there is nothing to refuse).

Initialisation as GPT-2: every Linear/Embedding weight ~ N(0, 0.02²), biases 0, LayerNorm weight 1 and
bias 0, and the two projections that write into the residual stream (``attn.proj``, ``mlp.proj``)
scaled by ``1/sqrt(2*depth)`` so the stream's variance does not grow with depth. Draws come only from
the global torch RNG in a fixed order, so ``torch.manual_seed(s)`` before construction fixes the weights.

Parameter names (``named_parameters()``): ``tok_emb.weight``, ``pos_emb.weight``,
``blocks.{i}.ln_1.{weight,bias}``, ``blocks.{i}.attn.qkv.{weight,bias}``, ``blocks.{i}.attn.proj.*``,
``blocks.{i}.ln_2.*``, ``blocks.{i}.mlp.fc.*``, ``blocks.{i}.mlp.proj.*``, ``ln_f.*`` and, untied only,
``head.weight`` (tied, the head's weight *is* ``tok_emb.weight`` and PyTorch lists it once under that
name). :meth:`GPT.lca_layers` groups them into LCA's layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GPT"]

INIT_STD = 0.02  # GPT-2's standard deviation for every weight matrix and embedding


def _dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity when ``p == 0`` (keeps vmap free of random draws)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: [B, T, width] -> [B, T, width].

    ``qkv`` (one Linear width -> 3*width) gives queries, keys and values; each head attends, with the
    softmax of ``q·k / sqrt(head_dim)`` masked to positions ≤ its own, to the values; ``proj`` mixes the
    heads back into the residual stream.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.width, self.heads = width, heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = _dropout(dropout)
        self.resid_drop = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, width] -> [B, T, width]; position t sees positions 0..t only."""
        B, T, C = x.shape
        H, D = self.heads, C // self.heads
        q, k, v = self.qkv(x).split(C, dim=-1)  # each [B, T, C]
        q, k, v = (a.reshape(B, T, H, D).transpose(1, 2) for a in (q, k, v))  # [B, H, T, D]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # [B, H, T, T]
        # Built per call (no buffer): follows the input's device, and the diagonal is always allowed, so
        # no row is all -inf and the softmax never gives NaN.
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = self.attn_drop(att) @ v  # [B, H, T, D]
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """Position-wise MLP: Linear(width, 4*width) - GELU - Linear(4*width, width), [B, T, width] -> same."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width)
        self.drop = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(·))``; [B, T, width]."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: idx [B, T] int64 -> logits [B, T, vocab], T ≤ ``context``.

    Args:
        vocab: number of token values (256 for bytes); also the number of logits per position.
        context: longest sequence the position embedding covers.
        depth: number of blocks (≥ 1).
        width: embedding / residual-stream size, divisible by ``heads``.
        heads: attention heads per block (head size ``width // heads``).
        dropout: rate of the embedding, attention-probability and residual dropouts (0 = none).
        tie: the head's weight is the token embedding's (one tensor, one set of LCA entries); false
            gives the head its own ``head.weight``.
    """

    def __init__(
        self,
        vocab: int,
        context: int,
        depth: int = 2,
        width: int = 64,
        heads: int = 4,
        dropout: float = 0.0,
        tie: bool = True,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.vocab, self.context, self.depth, self.tie = vocab, context, depth, tie
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.drop = _dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 init (module docstring), drawing in registration order from the global torch RNG."""
        resid_std = INIT_STD / math.sqrt(2 * self.depth)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if m is self.head and self.tie:
                    continue  # the token embedding, drawn already
                std = resid_std if name.endswith(("attn.proj", "mlp.proj")) else INIT_STD
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] int64 token values -> logits [B, T, vocab] (position t predicts token t+1)."""
        T = idx.shape[-1]
        if T > self.context:
            raise ValueError(
                f"sequence length {T} exceeds the model's context {self.context}: "
                f"give windows of at most {self.context} tokens or a larger context"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, T, width]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def lca_layers(self) -> list[tuple[str, list[str]]]:
        """LCA's layers of this model, as ``(layer name, [parameter names])`` in input -> output order.

        * ``embed``: token and position embeddings (tied, the head's weight is this same tensor and is
          counted here, once);
        * ``block{i}.attn``: ``ln_1`` + ``qkv`` + ``proj`` of block i (a LayerNorm belongs to the layer
          whose input it normalises, as a BatchNorm joins its conv in the paper's nets);
        * ``block{i}.mlp``: ``ln_2`` + ``fc`` + ``proj``;
        * ``head``: the final LayerNorm, plus ``head.weight`` when untied.

        Names are those of ``named_parameters()``; :func:`lca_lab.nets.layer_groups` checks and uses this.
        """
        layers = [("embed", ["tok_emb.weight", "pos_emb.weight"])]
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            attn = [f"{b}.{m}.{p}" for m in ("ln_1", "attn.qkv", "attn.proj") for p in ("weight", "bias")]
            mlp = [f"{b}.{m}.{p}" for m in ("ln_2", "mlp.fc", "mlp.proj") for p in ("weight", "bias")]
            layers += [(f"block{i}.attn", attn), (f"block{i}.mlp", mlp)]
        head = ["ln_f.weight", "ln_f.bias"] + ([] if self.tie else ["head.weight"])
        layers.append(("head", head))
        return layers
