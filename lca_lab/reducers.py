"""Streaming views of per-parameter LCA, kept on the device, so the paper's statistics exist even when the
[T, K] rows are not stored (``store.per_param=false``).

Per iteration (small tensors, returned by ``update``): the share of helping (LCA < 0), hurting (> 0) and
zero entries overall and per layer. Per parameter (accumulated, returned by ``result``): the number of
iterations it helped and hurt, and oscillation counters — how often its motion Δθ changed direction and
how often its full-training-set gradient changed sign (zeros do not count as a change; the last non-zero
sign is remembered), as in the paper's "weight movements change direction once every 6.7 iterations".

torch only; no host synchronisation in ``update``.
"""

from __future__ import annotations

import torch


class LCAReducer:
    """Accumulates per-iteration and per-parameter views of LCA.

    Args:
        layer_index: [K] int64, the layer of every parameter entry (on the run's device).
        n_layers: number of layers.
    """

    def __init__(self, layer_index: torch.Tensor, n_layers: int):
        self.index = layer_index
        self.n_layers = n_layers
        dev = layer_index.device
        K = layer_index.numel()
        self.layer_size = torch.bincount(layer_index, minlength=n_layers).double()
        self.helped = torch.zeros(K, dtype=torch.int32, device=dev)
        self.hurt = torch.zeros(K, dtype=torch.int32, device=dev)
        self.motion_changes = torch.zeros(K, dtype=torch.int32, device=dev)
        self.grad_changes = torch.zeros(K, dtype=torch.int32, device=dev)
        self._last_motion = torch.zeros(K, dtype=torch.int8, device=dev)
        self._last_grad = torch.zeros(K, dtype=torch.int8, device=dev)
        self.iterations = 0

    @staticmethod
    def _count_changes(sign: torch.Tensor, last: torch.Tensor, counter: torch.Tensor) -> None:
        counter += ((sign != 0) & (last != 0) & (sign != last)).int()
        last.copy_(torch.where(sign != 0, sign, last))

    def update(
        self, param: torch.Tensor, delta: torch.Tensor, grad0: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Fold in one iteration.

        Args:
            param: [K] LCA of this iteration (nats).
            delta: [K] θ_{t+1} − θ_t.
            grad0: [K] full-training-set gradient at θ_t.

        Returns (device tensors): ``frac_helping``, ``frac_hurting``, ``frac_zero`` (0-d, fractions of K)
        and ``layer_frac_helping``, ``layer_frac_hurting`` ([n_layers], fractions of each layer's entries).
        """
        helping, hurting = param < 0, param > 0
        self.helped += helping.int()
        self.hurt += hurting.int()
        self._count_changes(torch.sign(delta).to(torch.int8), self._last_motion, self.motion_changes)
        self._count_changes(torch.sign(grad0).to(torch.int8), self._last_grad, self.grad_changes)
        self.iterations += 1
        K = param.numel()
        lh = torch.zeros(self.n_layers, dtype=torch.float64, device=param.device)
        lu = torch.zeros_like(lh)
        lh.index_add_(0, self.index, helping.double())
        lu.index_add_(0, self.index, hurting.double())
        fh, fu = helping.sum().double() / K, hurting.sum().double() / K
        return {
            "frac_helping": fh,
            "frac_hurting": fu,
            "frac_zero": (param == 0).sum().double() / K,
            "layer_frac_helping": lh / self.layer_size,
            "layer_frac_hurting": lu / self.layer_size,
        }

    def result(self) -> dict[str, torch.Tensor]:
        """Per-parameter counters [K] (int32): ``param_helped``, ``param_hurt``, ``motion_changes``,
        ``grad_sign_changes``; read once at the end of a run."""
        return {
            "param_helped": self.helped,
            "param_hurt": self.hurt,
            "motion_changes": self.motion_changes,
            "grad_sign_changes": self.grad_changes,
        }

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The running state (CPU copies), for checkpoints: counters [K] int32, last signs [K] int8."""
        return {
            "helped": self.helped.cpu(),
            "hurt": self.hurt.cpu(),
            "motion_changes": self.motion_changes.cpu(),
            "grad_changes": self.grad_changes.cpu(),
            "last_motion": self._last_motion.cpu(),
            "last_grad": self._last_grad.cpu(),
            "iterations": int(self.iterations),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore :meth:`state_dict` (copied into this reducer's tensors, on its device)."""
        for key, dst in (
            ("helped", self.helped),
            ("hurt", self.hurt),
            ("motion_changes", self.motion_changes),
            ("grad_changes", self.grad_changes),
            ("last_motion", self._last_motion),
            ("last_grad", self._last_grad),
        ):
            src = state[key]
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"reducer state {key!r} does not fit: {tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src)
        self.iterations = int(state["iterations"])
