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

from .lca import LayerSums


class LCAReducer:
    """Accumulates per-iteration and per-parameter views of LCA.

    Args:
        layer_index: [K] int64, the layer of every parameter entry (on the run's device).
        n_layers: number of layers.
        layer_sums: a :class:`~lca_lab.lca.LayerSums` over the same index to share (e.g. the engine's),
            else one is built.

    ``layer_sums`` ([..., K] → [..., n_layers] float64) is the reducer's :class:`~lca_lab.lca.LayerSums`,
    for callers that sum other per-parameter vectors by layer.
    """

    def __init__(self, layer_index: torch.Tensor, n_layers: int, layer_sums: LayerSums | None = None):
        self.index = layer_index
        self.n_layers = n_layers
        dev = layer_index.device
        K = layer_index.numel()
        self.layer_size = torch.bincount(layer_index, minlength=n_layers).double()
        # K as a device tensor: CUDA divides by a Python scalar as a multiplication by its reciprocal,
        # which can differ from the CPU's quotient in the last bit; a tensor divisor is a true division.
        self._n = self.layer_size.sum()
        # [helping, hurting] counts → [helping, hurting, zero] = counts @ M + (0, 0, K): one kernel, exact
        self._to_hhz = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]], dtype=torch.float64, device=dev)
        self._hhz_bias = torch.cat([torch.zeros(2, dtype=torch.float64, device=dev), self._n.reshape(1)])
        # Helped and hurt counters side by side ([2, K], one kernel updates both; named views of the rows).
        self._helped_hurt = torch.zeros(2, K, dtype=torch.int32, device=dev)
        self.helped, self.hurt = self._helped_hurt[0], self._helped_hurt[1]
        # Motion and gradient counters side by side ([2, K]; the named tensors are views of their rows) so
        # that one set of kernels updates both.
        self._changes = torch.zeros(2, K, dtype=torch.int32, device=dev)
        self._last = torch.zeros(2, K, dtype=torch.int8, device=dev)
        self.motion_changes, self.grad_changes = self._changes[0], self._changes[1]
        self._last_motion, self._last_grad = self._last[0], self._last[1]
        self.iterations = 0
        # Per-layer counts by prefix sums, not index_add_: its atomics into a few slots serialise on a GPU.
        self.layer_sums = LayerSums(layer_index, n_layers) if layer_sums is None else layer_sums
        if self.layer_sums.K != K or self.layer_sums.n_layers != n_layers:
            raise ValueError(
                f"layer_sums sums {self.layer_sums.K} entries into {self.layer_sums.n_layers} layers; the "
                f"reducer's index has {K} entries in {n_layers} layers"
            )

    @staticmethod
    def _count_changes(x: torch.Tensor, last: torch.Tensor, counter: torch.Tensor) -> None:
        """Count a change where sign(x) and the last non-zero sign are both non-zero and differ."""
        sign = torch.sign(x).to(torch.int8)
        # For signs in {−1, 0, 1} the product is −1 exactly when both are non-zero and differ.
        counter += sign * last < 0
        torch.where(sign != 0, sign, last, out=last)

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
        # Few, fused ops: on a GPU this runs every iteration and small nets are bound by kernel launches.
        # (A NaN entry is neither < 0 nor > 0, so it counts as zero.)
        hh = torch.stack([param < 0, param > 0]).view(torch.int8)  # [2, K] 0/1: helped, hurt (a free view)
        self._helped_hurt += hh
        self._count_changes(torch.stack([delta, grad0.to(delta.dtype)]), self._last, self._changes)
        self.iterations += 1
        layer, tot = self.layer_sums.with_total(hh)  # [2, n_layers], [2] float64 counts (exact)
        frac = torch.addmm(self._hhz_bias, tot[None], self._to_hhz)[0] / self._n  # helping, hurting, zero
        layer_frac = layer / self.layer_size
        return {
            "frac_helping": frac[0],
            "frac_hurting": frac[1],
            "frac_zero": frac[2],
            "layer_frac_helping": layer_frac[0],
            "layer_frac_hurting": layer_frac[1],
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

    @property
    def last_motion(self) -> torch.Tensor:
        """[K] int8, the last non-zero sign of each parameter's motion Δθ (0: it never moved); a view of
        the running state, not a copy."""
        return self._last_motion

    @property
    def last_grad(self) -> torch.Tensor:
        """[K] int8, the last non-zero sign of each parameter's full-training-set gradient (0: never
        non-zero); a view of the running state, not a copy."""
        return self._last_grad

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
