"""Streaming reducers against brute-force computations from the stored per-parameter rows."""

import h5py
import numpy as np
import pytest
import torch
from test_train import _cfg

from lca_lab.lca import LayerSums
from lca_lab.reducers import LCAReducer
from lca_lab.train import run


def _changes(signs: np.ndarray) -> np.ndarray:
    """Reference: count sign changes along axis 0, ignoring zeros (the last non-zero sign is kept)."""
    out = np.zeros(signs.shape[1], dtype=np.int64)
    for k in range(signs.shape[1]):
        s = signs[:, k][signs[:, k] != 0]
        out[k] = int(np.sum(s[1:] != s[:-1]))
    return out


@pytest.mark.parametrize("order", ["contiguous", "runs"])
@pytest.mark.parametrize("dense", [False, True])
def test_reducer_counts_match_brute_force(order, dense):
    """``runs``: layer 0's entries in two runs around layer 1's (as a weight and a bias may lie), which
    the per-layer counts' prefix sums must add up; ``dense``: the one-product way LayerSums takes on CUDA.
    A NaN entry of the LCA counts as zero."""
    g = torch.Generator().manual_seed(0)
    T, K = 30, 12
    param = torch.randn(T, K, generator=g, dtype=torch.float64)
    param[param.abs() < 0.3] = 0.0
    param[4, 3] = float("nan")
    delta = torch.randn(T, K, generator=g, dtype=torch.float64)
    delta[:, 0] = 0.0  # a frozen entry never changes direction
    grad = torch.randn(T, K, generator=g, dtype=torch.float64)
    index = torch.tensor([0] * 5 + [1] * 7)
    perm = torch.arange(K) if order == "contiguous" else torch.tensor([0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 3, 4])
    param, delta, grad = param[:, perm], delta[:, perm], grad[:, perm]
    index = index[perm]
    red = LCAReducer(index, 2, LayerSums(index, 2, dense=dense))
    assert red.layer_sums.strategy == ("dense" if dense else "prefix")
    views = [red.update(param[t], delta[t], grad[t]) for t in range(T)]
    res = {k: v.numpy() for k, v in red.result().items()}
    p = param.numpy()
    l0, l1 = index.numpy() == 0, index.numpy() == 1
    np.testing.assert_array_equal(res["param_helped"], (p < 0).sum(0))
    np.testing.assert_array_equal(res["param_hurt"], (p > 0).sum(0))
    np.testing.assert_array_equal(res["motion_changes"], _changes(np.sign(delta.numpy())))
    np.testing.assert_array_equal(res["grad_sign_changes"], _changes(np.sign(grad.numpy())))
    assert res["motion_changes"][0] == 0
    fh = np.array([float(v["frac_helping"]) for v in views])
    np.testing.assert_allclose(fh, (p < 0).mean(1))
    lh = np.stack([v["layer_frac_helping"].numpy() for v in views])
    np.testing.assert_allclose(lh[:, 1], (p[:, l1] < 0).mean(1))
    fz = np.array([float(v["frac_zero"]) for v in views])
    np.testing.assert_allclose(fz, ((p == 0) | np.isnan(p)).mean(1))
    assert np.isnan(p).sum() == 1 and fz[4] > (p[4] == 0).mean()
    fu = np.array([float(v["frac_hurting"]) for v in views])
    np.testing.assert_allclose(fu, (p > 0).mean(1))
    lu = np.stack([v["layer_frac_hurting"].numpy() for v in views])
    np.testing.assert_allclose(lh[:, 0], (p[:, l0] < 0).mean(1))
    np.testing.assert_allclose(lu, np.stack([(p[:, l0] > 0).mean(1), (p[:, l1] > 0).mean(1)], 1))
    assert all(v.dtype == torch.int32 for v in red.result().values())  # the run file's dtype


def test_run_file_reducers_match_stored_rows(tmp_path):
    run(_cfg("data=mnist5k", "batch_size=500", "epochs=2", "store.trajectory=true"), tmp_path)
    with h5py.File(tmp_path / "lca.h5") as f:
        p = f["lca/param"][:]
        theta = f["trajectory/theta"][:]
        np.testing.assert_array_equal(f["reduce/param_helped"][:], (p < 0).sum(0))
        np.testing.assert_array_equal(f["reduce/param_hurt"][:], (p > 0).sum(0))
        np.testing.assert_allclose(f["reduce/frac_helping"][:], (p < 0).mean(1))
        motion = _changes(np.sign(np.diff(theta.astype(np.float64), axis=0)))
        np.testing.assert_array_equal(f["reduce/motion_changes"][:], motion)
        assert f["reduce/layer_frac_helping"].shape == (p.shape[0], 3)


def test_reducer_shares_a_layer_sums_over_its_index_and_rejects_another():
    """train.py hands the engine's LayerSums to the reducer (one membership matrix, not two)."""
    index = torch.tensor([0, 0, 1, 2, 2])
    shared = LayerSums(index, 3)
    assert LCAReducer(index, 3, shared).layer_sums is shared
    with pytest.raises(ValueError, match="reducer's index has 5 entries in 3 layers"):
        LCAReducer(index, 3, LayerSums(index[:4], 3))
    with pytest.raises(ValueError, match="into 4 layers"):
        LCAReducer(index, 3, LayerSums(index, 4))
