"""The LCA engine against closed forms and slow float64 references on tiny problems."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pipelined import pipelined_steps
from torch import nn

from lca_lab.lca import FullBatchLoss, LayerSums, LCAEngine, check_engine_options, lca_eval_mode


def mse_sum(out, y, reduction="sum"):
    return ((out.squeeze(-1) - y) ** 2).sum()


def _linear_problem(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    return model, x, y


def _closed_form_grad(x, y, w, b):
    """∇ of mean((x w + b − y)²) w.r.t. (w [1,d], b [1]), flattened in named_parameters order."""
    r = x @ w.reshape(-1) + b - y
    gw = 2.0 * (x * r[:, None]).mean(0)
    gb = 2.0 * r.mean()
    return torch.cat([gw, gb.reshape(1)])


def test_simpson_is_exact_on_quadratic_loss():
    model, x, y = _linear_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=16, loss_fn=mse_sum)
    engine = LCAEngine(fbl, "rk4", tolerance=1e-12, max_splits=32)
    theta0 = fbl.flat_params()
    g = torch.Generator().manual_seed(1)
    theta1 = theta0 + 0.7 * torch.randn(theta0.shape, generator=g, dtype=torch.float64)
    st = engine.step(theta0, theta1)
    dl = fbl.loss(theta1) - fbl.loss(theta0)
    assert abs(float(st.total - dl)) < 1e-9
    assert st.splits == 2  # exact already: no refinement
    # Each A[i] = ∂_i L(midpoint) · Δ_i, because ∇L is linear in θ for a quadratic loss.
    mid = 0.5 * (theta0 + theta1)
    expected = _closed_form_grad(x, y, mid[:5], mid[5]) * (theta1 - theta0)
    torch.testing.assert_close(st.param, expected, rtol=1e-10, atol=1e-12)


def test_first_order_is_worse_on_curved_problem():
    torch.manual_seed(0)
    x = torch.randn(200, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    fbl = FullBatchLoss(model, x, y, chunk_size=200)
    theta0 = fbl.flat_params()
    theta1 = theta0 + 0.3 * torch.randn_like(theta0)
    first = LCAEngine(fbl, "first_order").step(theta0, theta1)
    rk4 = LCAEngine(fbl, "rk4", tolerance=1e-8).step(theta0, theta1)
    assert abs(float(first.error)) > 100 * abs(float(rk4.error))
    assert abs(float(first.error)) > 1e-3
    # Regression: first order never refines, but a row over the tolerance is flagged (it was always True).
    assert rk4.converged and not first.converged
    loose = LCAEngine(fbl, "first_order", tolerance=2 * abs(float(first.error))).step(theta0, theta1)
    assert loose.converged


def test_refinement_on_large_steps_ends_within_tolerance():
    torch.manual_seed(0)
    x = torch.randn(300, 6)
    y = torch.randint(0, 3, (300,))
    # Smooth activation: Simpson's error then falls as h⁴ (ReLU kinks on 300 points would not).
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    fbl = FullBatchLoss(model, x, y, chunk_size=100)
    engine = LCAEngine(fbl, "rk4", tolerance=1e-4, max_splits=32)
    theta0 = fbl.flat_params()
    theta1 = theta0 + 0.3 * torch.randn_like(theta0)
    st = engine.step(theta0, theta1)
    assert st.splits > 2
    assert st.converged and abs(float(st.error)) <= 1e-4
    # Non-adaptive RK4 on the same step misses the tolerance: the refinement did the work.
    fixed = LCAEngine(fbl, "rk4", tolerance=1e-4, adaptive=False).step(theta0, theta1)
    assert fixed.splits == 2 and abs(float(fixed.error)) > 1e-4 and not fixed.converged


def test_not_converged_is_flagged_at_max_splits():
    torch.manual_seed(0)
    x = torch.randn(100, 6)
    y = torch.randint(0, 3, (100,))
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    fbl = FullBatchLoss(model, x, y, chunk_size=100)
    engine = LCAEngine(fbl, "rk4", tolerance=1e-12, max_splits=4)
    theta0 = fbl.flat_params()
    st = engine.step(theta0, theta0 + 2.0 * torch.randn_like(theta0))
    assert st.splits == 4 and not st.converged


def test_endpoint_gradient_is_reused():
    model, x, y = _linear_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=64, loss_fn=mse_sum)
    engine = LCAEngine(fbl, "rk4", tolerance=1.0)
    t0 = fbl.flat_params()
    t1, t2 = t0 + 0.01, t0 + 0.02
    assert engine.step(t0, t1).passes == 3  # θ0, midpoint, θ1
    assert engine.step(t1, t2).passes == 2  # θ1 reused: midpoint and θ2 only


def test_float32_fast_path_matches_float64_reference():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.randint(0, 4, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref_model = copy.deepcopy(model).double()
    fast = FullBatchLoss(model, x, y, chunk_size=64)
    ref = FullBatchLoss(ref_model, x.double(), y, chunk_size=256)
    t0 = fast.flat_params()
    t1 = t0 + 0.05 * torch.randn_like(t0)
    a = LCAEngine(fast, tolerance=1e-6).step(t0, t1)
    b = LCAEngine(ref, tolerance=1e-10).step(t0.double(), t1.double())
    torch.testing.assert_close(a.param, b.param, rtol=1e-3, atol=1e-7)
    assert abs(float(a.total - b.total)) < 1e-5


class _BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def test_bn_dropout_loss_is_pure_function_of_theta():
    torch.manual_seed(0)
    model = _BNDropNet()
    model.train()
    x = torch.randn(50, 1, 8, 8)
    y = torch.randint(0, 3, (50,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fbl = FullBatchLoss(model, x, y, chunk_size=20)
    theta = fbl.flat_params()
    l1, g1 = fbl.loss_and_grad(theta)
    l2, g2 = fbl.loss_and_grad(theta)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert torch.equal(fbl.loss(theta), l1)
    LCAEngine(fbl).step(theta, theta + 0.01)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by LCA evaluation"
    assert model.training and model.drop.training and model.bn.track_running_stats
    # BN uses per-chunk batch statistics: a different chunk size defines a different L.
    assert not torch.equal(FullBatchLoss(model, x, y, chunk_size=50).loss(theta), l1)


def test_lca_eval_mode_restores_flags_after_error():
    model = _BNDropNet().eval()
    with pytest.raises(RuntimeError):
        with lca_eval_mode(model):
            assert model.bn.training and not model.drop.training
            raise RuntimeError("boom")
    assert not model.bn.training and model.bn.track_running_stats


def test_layer_sums():
    p = torch.tensor([1.0, 2.0, 3.0, -4.0], dtype=torch.float64)
    idx = torch.tensor([0, 0, 2, 1])
    assert LayerSums(idx, 3)(p).tolist() == [3.0, -4.0, 3.0]


def _layer_sums_reference(x: np.ndarray, index: np.ndarray, n_layers: int) -> np.ndarray:
    """Slow reference: float64 sums of the entries of each layer, per row of x [..., K]."""
    x = x.astype(np.float64)
    return np.stack([x[..., index == l].sum(-1) for l in range(n_layers)], -1)


@pytest.mark.parametrize(
    "layout",
    ["contiguous", "runs", "interleaved", "unused_layer", "one_entry", "fallback"],
)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_layer_sums_match_float64_reference(layout, dense, lead, monkeypatch):
    """Per-layer sums every way LayerSums takes (one product with the membership matrix, prefix sums,
    the index_add_ fallback) against per-layer float64 sums, for every layout of layers along the flat
    vector and any leading dims (per-class rows, the reducer's [2, K])."""
    g = np.random.default_rng(0)
    sizes = {"contiguous": [40, 300, 7, 1], "runs": [30, 5, 200, 11, 3, 60]}
    if layout in sizes:  # runs of parameters; "runs" returns to layers already seen (weight ... bias)
        layers = [0, 1, 2, 3] if layout == "contiguous" else [0, 1, 2, 0, 3, 1]
        index = np.repeat(layers, sizes[layout])
    elif layout == "interleaved":
        index = g.integers(0, 4, 500)
    elif layout == "unused_layer":
        index = np.repeat([0, 2, 3], [50, 20, 9])
    elif layout == "one_entry":
        index = np.array([2])
    else:  # too many runs for the ±1 matrix, too big for the membership matrix
        monkeypatch.setattr(LayerSums, "MAX_MATRIX", 3)
        monkeypatch.setattr(LayerSums, "MAX_DENSE", 3)
        index = np.repeat([0, 1, 2, 3, 0], [5, 6, 7, 8, 9])
    n = 4
    x = g.standard_normal((*lead, len(index))).astype(np.float32)
    sums = LayerSums(torch.from_numpy(index), n, dense=dense)
    want = "index_add" if layout == "fallback" else "dense" if dense else "prefix"
    assert sums.strategy == want
    out = sums(torch.from_numpy(x))
    assert out.dtype == torch.float64 and out.shape == (*lead, n)
    np.testing.assert_allclose(out.numpy(), _layer_sums_reference(x, index, n), rtol=1e-12, atol=1e-12)
    # 0/1 entries (the reducer's helped/hurt rows) are counted exactly
    b = (x > 0).astype(np.int8)
    np.testing.assert_array_equal(sums(torch.from_numpy(b)).numpy(), _layer_sums_reference(b, index, n))
    # with_total: the same sums and the whole rows' sums, from one product (the engine's total)
    layer, total = sums.with_total(torch.from_numpy(x))
    assert layer.dtype == total.dtype == torch.float64 and layer.shape == (*lead, n) and total.shape == lead
    np.testing.assert_allclose(layer.numpy(), _layer_sums_reference(x, index, n), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total.numpy(), x.astype(np.float64).sum(-1), rtol=1e-12, atol=1e-12)
    lb, tb = sums.with_total(torch.from_numpy(b))
    np.testing.assert_array_equal(lb.numpy(), _layer_sums_reference(b, index, n))
    np.testing.assert_array_equal(tb.numpy(), b.astype(np.float64).sum(-1))


def test_layer_sums_take_the_membership_matrix_on_cuda_only_by_default(monkeypatch):
    """The one-kernel way is for launch-bound GPU loops: on the CPU the default stays with prefix sums,
    and an index too big for the membership matrix takes them on any device."""
    idx = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 5, 6]))
    assert LayerSums(idx, 3).strategy == "prefix"
    dense = LayerSums(idx, 3, dense=True)
    assert dense.strategy == "dense" and dense._dense.sum(0).tolist() == [4.0, 5.0, 6.0]
    monkeypatch.setattr(LayerSums, "MAX_DENSE", 15 * 3 - 1)
    assert LayerSums(idx, 3, dense=True).strategy == "prefix"


def test_layer_sums_reject_bad_shapes():
    with pytest.raises(ValueError, match="out of range"):
        LayerSums(torch.tensor([0, 1, 4]), 4)
    with pytest.raises(ValueError, match="expected"):
        LayerSums(torch.tensor([0, 1, 1]), 2)(torch.zeros(4))
    with pytest.raises(ValueError, match="expected"):
        LayerSums(torch.tensor([0, 1, 1]), 2).with_total(torch.zeros(4))


@pytest.mark.parametrize(
    "method,tol,splits,match",
    [
        ("simpson3", 1e-3, 32, "lca.method"),
        ("rk4", 0.0, 32, "lca.tolerance"),
        ("rk4", -1, 32, "tolerance"),
        ("rk4", 1e-3, 12, "max_splits"),
        ("rk4", 1e-3, 1, "max_splits"),
    ],
)
def test_invalid_engine_options(method, tol, splits, match):
    with pytest.raises(ValueError, match=match):
        check_engine_options(method, tol, splits)


def test_invalid_chunk_size():
    model, x, y = _linear_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        FullBatchLoss(model, x, y, chunk_size=0, loss_fn=mse_sum)


def test_default_loss_is_cross_entropy_mean():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    fbl = FullBatchLoss(model, x, y, chunk_size=3)
    expected = F.cross_entropy(model(x).double(), y).detach()
    assert abs(float(fbl.loss(fbl.flat_params())) - float(expected)) < 1e-6


class _SmoothBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x.flatten(1)))))


@pytest.mark.parametrize("with_bn", [False, True])
def test_per_class_lca_sums_to_total_and_conserves_per_class(with_bn):
    torch.manual_seed(0)
    x = torch.randn(120, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    model = (
        _SmoothBNNet()
        if with_bn
        else nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
    ).double()
    plain = FullBatchLoss(model, x, y, chunk_size=40)
    fbl = FullBatchLoss(model, x, y, chunk_size=40, n_classes=3)
    t0 = plain.flat_params()
    t1 = t0 + 0.02 * torch.randn_like(t0)
    # Per-class parts add up to L and ∇L (for BN: with the same chunks, so the same L).
    lc, gc = fbl.class_loss_and_grad(t0)
    l, g = plain.loss_and_grad(t0)
    assert abs(float(lc.sum() - l)) < 1e-10
    torch.testing.assert_close(gc.sum(0), g, rtol=1e-8, atol=1e-12)
    if not with_bn:  # class c's part is the loss of its own examples, scaled by 1/N
        with torch.no_grad():
            for c in range(3):
                own = F.cross_entropy(model(x[y == c]), y[y == c], reduction="sum") / 120
                assert abs(float(lc[c]) - float(own)) < 1e-10
    st = LCAEngine(fbl, tolerance=1e-9, per_class=True).step(t0, t1)
    torch.testing.assert_close(st.class_param.sum(0), st.param, rtol=1e-10, atol=1e-14)
    per_class_err = st.class_param.sum(1) - (st.class_loss1 - st.class_loss0)
    assert per_class_err.abs().max() < 1e-7
    ref_step = LCAEngine(plain, tolerance=1e-9).step(t0, t1)
    torch.testing.assert_close(st.param, ref_step.param, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("method", ["rk4", "trapezoid", "first_order"])
def test_per_class_lca_of_every_method_is_the_class_split_of_its_lca(method):
    """Per class, every method: the [C, K] rows add up to the step's per-parameter LCA, which equals the
    plain engine's (the class split is of the same quadrature, whichever allocation made it)."""
    torch.manual_seed(1)
    x, y = torch.randn(90, 10, dtype=torch.float64), torch.randint(0, 3, (90,))
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    fbl = FullBatchLoss(model, x, y, chunk_size=30, n_classes=3)
    plain = FullBatchLoss(model, x, y, chunk_size=30)
    t0 = plain.flat_params()
    t1 = t0 + 0.3 * torch.randn_like(t0)  # large enough that rk4 and trapezoid refine
    st = LCAEngine(fbl, method, tolerance=1e-6, per_class=True).step(t0, t1)
    ref = LCAEngine(plain, method, tolerance=1e-6).step(t0, t1)
    assert st.splits == ref.splits and (method == "first_order" or st.splits > 2)
    torch.testing.assert_close(st.class_param.sum(0), st.param, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(st.param, ref.param, rtol=1e-7, atol=1e-12)


def test_test_set_lca_conserves_on_held_out_loss():
    torch.manual_seed(0)
    x, y = torch.randn(200, 6, dtype=torch.float64), torch.randint(0, 3, (200,))
    xt, yt = torch.randn(80, 6, dtype=torch.float64), torch.randint(0, 3, (80,))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    train, test = FullBatchLoss(model, x, y, chunk_size=100), FullBatchLoss(model, xt, yt, chunk_size=100)
    engine = LCAEngine(train, tolerance=1e-9, test_loss=test)
    t0 = train.flat_params()
    t1 = t0 + 0.1 * torch.randn_like(t0)
    st = engine.step(t0, t1)
    assert abs(float(st.test_error)) < 1e-6
    assert abs(float(st.test_loss1 - test.loss(t1))) < 1e-12
    assert not torch.allclose(st.test_param, st.param)  # a different loss, a different allocation
    st2 = engine.step(t1, t1 + 0.01)
    assert st2.passes == 2 and abs(float(st2.test_loss0 - st.test_loss1)) == 0.0  # endpoint reused


def _tanh_problem(n=240, d=6, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c)).to(dtype)
    return model, x, y


def _trajectory(fbl, n_steps, scale, seed=1):
    """θ_0 … θ_n: a random walk with step sizes growing so that some steps need refinement."""
    g = torch.Generator().manual_seed(seed)
    th = [fbl.flat_params()]
    for t in range(n_steps):
        step = torch.randn(th[-1].shape, generator=g, dtype=th[-1].dtype)
        th.append(th[-1] + scale * (1 + t % 4) * step)
    return th


def test_trapezoid_uses_one_pass_when_within_tolerance_and_escalates_otherwise():
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    tol = 1e-5
    th = _trajectory(fbl, 12, 0.02)
    trap = LCAEngine(fbl, "trapezoid", tolerance=tol, max_splits=64)
    trap.prime(th[0])
    steps = [trap.step(a, b) for a, b in zip(th[:-1], th[1:])]
    assert {s.passes for s in steps} >= {1}  # some steps cost one pass only
    assert any(s.passes > 1 for s in steps)  # and some escalated to Simpson
    for s, a, b in zip(steps, th[:-1], th[1:]):
        dl = float(fbl.loss(b) - fbl.loss(a))
        assert abs(float(s.total) - dl) <= tol  # the same per-iteration guarantee as RK4
        assert s.converged
        if s.passes == 1:
            # one-pass steps are the trapezoid rule: ḡ = (g0 + g1)/2
            g0, g1 = fbl.loss_and_grad(a)[1], fbl.loss_and_grad(b)[1]
            torch.testing.assert_close(s.param, 0.5 * (g0 + g1) * (b - a), rtol=1e-10, atol=1e-14)
    # Non-adaptive trapezoid never refines, and its residual on the big steps exceeds the tolerance.
    fixed = LCAEngine(fbl, "trapezoid", tolerance=tol, adaptive=False)
    big = [fixed.step(a, b) for a, b in zip(th[:-1], th[1:])]
    assert all(s.splits == 1 for s in big) and max(abs(float(s.error)) for s in big) > tol


@pytest.mark.parametrize("method", ["first_order", "trapezoid", "rk4"])
@pytest.mark.parametrize("block", [2, 5, 64])
def test_batched_trajectory_equals_step_by_step(method, block):
    """steps() (vmap over many points, refinement batched across steps) = step() on each pair."""
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 11, 0.02)
    ref_engine = LCAEngine(fbl, method, tolerance=1e-5, max_splits=64)
    ref = [ref_engine.step(a, b) for a, b in zip(th[:-1], th[1:])]
    eng = LCAEngine(fbl, method, tolerance=1e-5, max_splits=64)
    got = list(eng.steps(torch.stack(th), batch_points=block))
    assert len(got) == len(ref) == 11
    for r, s in zip(ref, got):
        assert (s.splits, s.converged, s.passes) == (r.splits, r.converged, r.passes)
        torch.testing.assert_close(s.param, r.param, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(s.error, r.error, rtol=1e-6, atol=1e-13)
        torch.testing.assert_close(s.loss1, r.loss1, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.grad0, r.grad0, rtol=1e-9, atol=1e-13)
    # the endpoint cache is left at θ_n, as after step-by-step use
    assert eng.cached_point["L"].item() == pytest.approx(ref_engine.cached_point["L"].item(), rel=1e-12)


@pytest.mark.parametrize("method", ["first_order", "trapezoid", "rk4"])
@pytest.mark.parametrize("way", ["prefix", "dense", "index_add"])
def test_engine_layer_sums_come_with_the_total_and_conserve(method, way, monkeypatch):
    """With ``layer_sums`` every step carries its per-layer LCA (``StepLCA.layer``), the total taken from
    the same product: online in train.py's pipelined order and batched (recompute), every way LayerSums
    takes. Against float64 per-layer sums of ``param``, the plain engine's numbers and decisions, and ΔL."""
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 9, 0.02)
    # weight₀ → 0, bias₀ → 1, weight₁ → 2, bias₁ → 0: a layer in two runs, as a prefix index can have
    index = torch.repeat_interleave(torch.tensor([0, 1, 2, 0]), torch.tensor(fbl.numels))
    if way == "index_add":
        monkeypatch.setattr(LayerSums, "MAX_MATRIX", 1)
        monkeypatch.setattr(LayerSums, "MAX_DENSE", 1)
    sums = LayerSums(index, 3, dense=way == "dense")
    assert sums.strategy == way
    tol = 1e-5
    plain, _ = pipelined_steps(LCAEngine(fbl, method, tolerance=tol, max_splits=64), th)
    online, _ = pipelined_steps(LCAEngine(fbl, method, tolerance=tol, max_splits=64, layer_sums=sums), th)
    batched = list(LCAEngine(fbl, method, tolerance=tol, max_splits=64, layer_sums=sums).steps(th, 4))
    assert all(p.layer is None for p in plain)
    for got in (online, batched):
        assert len(got) == len(plain) == 9
        for p, s, a, b in zip(plain, got, th[:-1], th[1:]):
            assert (s.splits, s.passes, s.converged) == (p.splits, p.passes, p.converged)
            torch.testing.assert_close(s.param, p.param, rtol=1e-9, atol=1e-13)
            ref = _layer_sums_reference(s.param.numpy(), index.numpy(), 3)
            assert s.layer.dtype == torch.float64 and s.layer.shape == (3,)
            np.testing.assert_allclose(s.layer.numpy(), ref, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(s.total, s.param.sum(), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(s.total, p.total, rtol=1e-9, atol=1e-13)
            # conservation: the error is the total's, and converged steps are within the tolerance
            dl = float(fbl.loss(b) - fbl.loss(a))
            assert float(s.error) == pytest.approx(float(s.total) - dl, abs=1e-12)
            assert not s.converged or abs(float(s.total) - dl) <= tol
    if method != "first_order":  # first order is flagged, not refined: the tolerance binds the others
        assert all(s.converged for s in online + batched)


def test_engine_rejects_layer_sums_of_another_model():
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    with pytest.raises(ValueError, match="entry_layer_index"):
        LCAEngine(fbl, layer_sums=LayerSums(torch.zeros(fbl.n_params - 1, dtype=torch.long), 1))


def test_batched_trajectory_float32_matches_float64_reference():
    model, x, y = _tanh_problem(dtype=torch.float32)
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 8, 0.01)
    got = list(LCAEngine(fbl, "trapezoid", tolerance=1e-4).steps(th, batch_points=4))
    m64 = copy.deepcopy(model).double()
    ref_fbl = FullBatchLoss(m64, x.double(), y, chunk_size=240)
    ref_engine = LCAEngine(ref_fbl, "trapezoid", tolerance=1e-4)
    ref = [ref_engine.step(a.double(), b.double()) for a, b in zip(th[:-1], th[1:])]
    assert any(r.passes > 1 for r in ref) and any(r.passes == 1 for r in ref)  # both branches covered
    for r, s in zip(ref, got):
        assert (s.splits, s.passes) == (r.splits, r.passes)
        # float32 gradients (rel. rounding ~1e-7 per product, summed over 240 examples) times |Δ|
        assert (s.param - r.param).abs().max() < 1e-5 * r.param.abs().max()
        assert abs(float(s.total - r.total)) < 1e-6


def test_channels_last_gives_the_same_numbers():
    torch.manual_seed(0)
    x = torch.randn(40, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(320, 4)
    ).double()
    plain = FullBatchLoss(model, x, y, chunk_size=20)
    cl = FullBatchLoss(model, x, y, chunk_size=20, channels_last=True)
    assert cl.x.is_contiguous(memory_format=torch.channels_last)
    th0 = plain.flat_params()
    th1 = th0 + 0.05 * torch.randn_like(th0)
    a = LCAEngine(plain, "rk4", tolerance=1e-8).step(th0, th1)
    b = LCAEngine(cl, "rk4", tolerance=1e-8).step(th0, th1)
    torch.testing.assert_close(b.param, a.param, rtol=1e-10, atol=1e-14)
    assert b.splits == a.splits


def test_matmul_precision_sets_and_restores_flags():
    from lca_lab.lca import matmul_precision

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with matmul_precision("fp32"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
    with pytest.raises(ValueError, match="precision"):
        with matmul_precision("fp16"):
            pass


@pytest.mark.parametrize("start", [False, True])
def test_cudnn_benchmark_is_on_in_every_pass_and_restored(start):
    """FullBatchLoss(cudnn_benchmark=True): cuDNN's autotuner is on inside every kind of pass (seen from a
    forward hook) and the caller's setting is back afterwards, also after an error; without it, passes
    run under the caller's setting. On the CPU the numbers are the same."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.benchmark))
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = start
    try:
        bm = FullBatchLoss(model, x, y, chunk_size=20, n_classes=3, cudnn_benchmark=True)
        plain = FullBatchLoss(model, x, y, chunk_size=20, n_classes=3)
        th = bm.flat_params()
        pts = torch.stack([th, th + 0.01])
        for f in (bm, plain):
            seen.clear()
            out = [f.loss(th), f.loss_and_grad(th), f.loss_and_grad_batch(pts), f.class_loss_and_grad(th)]
            assert len(seen) == 2 + 2 + 2 + 2  # two chunks per pass
            assert set(seen) == ({True} if f is bm else {start})
            assert torch.backends.cudnn.benchmark is start
            if f is bm:
                got = out
        for a, b in zip(got, out):
            for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(u, v, rtol=0, atol=0)
        with pytest.raises(RuntimeError):
            bm.loss(th[:-1])  # wrong length: fails inside the pass
        assert torch.backends.cudnn.benchmark is start
    finally:
        torch.backends.cudnn.benchmark = saved


def test_auto_chunk_size():
    from lca_lab.lca import auto_chunk_size

    fc = nn.Sequential(nn.Linear(4, 4))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert auto_chunk_size(fc, 55000, "cuda") == 55000  # launch-bound: one chunk
    assert auto_chunk_size(bn, 45000, "cuda") == 5000  # part of L's definition with BN
    assert auto_chunk_size(fc, 55000, "cpu") == 5000
    assert auto_chunk_size(fc, 300, "cpu") == 300


def test_auto_chunk_size_on_cpu_keeps_the_largest_activation_small():
    """CPU, no BatchNorm: the chunk keeps the largest saved activation under CPU_CHUNK_BYTES (big blocks are
    mmapped and page-faulted in again on every pass); small nets keep 5000; BN nets keep 5000 always."""
    from lca_lab import nets
    from lca_lab.lca import CPU_CHUNK_BYTES, auto_chunk_size, saved_activation_bytes

    def build_net(name, shape, n_classes, **kwargs):  # the built-in net lca_lab.nets.<name>
        return getattr(nets, name)(input_shape=shape, n_classes=n_classes, **kwargs)

    x = torch.randn(8, 1, 28, 28)
    lenet = build_net("lenet", (1, 28, 28), 10, padding=2)
    total, per_example = saved_activation_bytes(lenet, x[:4])
    # conv1's output, 20 channels × 28 × 28 float32, is the largest tensor LeNet saves per example
    assert per_example == 20 * 28 * 28 * 4
    assert total > per_example  # every saved activation, conv1's among them
    chunk = auto_chunk_size(lenet, 55000, "cpu", x)
    assert chunk * per_example <= CPU_CHUNK_BYTES < (chunk + 1) * per_example
    assert auto_chunk_size(build_net("fc", (1, 28, 28), 10), 55000, "cpu", x) == 5000  # 100 floats/example
    bn = build_net("resnet20", (3, 32, 32), 10, width=4)
    assert auto_chunk_size(bn, 45000, "cpu", torch.randn(4, 3, 32, 32)) == 5000  # L's definition
    assert auto_chunk_size(lenet, 40, "cpu", x) == 40


def test_auto_chunk_size_on_a_gpu_keeps_a_chunks_activations_under_the_bound():
    """Regression: on a GPU, auto took the whole set for every net without BatchNorm, and LeNet on 55,000
    MNIST images peaked at 41 GB on an H200 (out of memory on most cards). Now one chunk's saved
    activations stay under GPU_CHUNK_BYTES; MNIST-FC, launch-bound, keeps the whole set."""
    from lca_lab import nets
    from lca_lab.lca import GPU_CHUNK_BYTES, auto_chunk_size, saved_activation_bytes

    def build_net(name, shape, n_classes, **kwargs):  # the built-in net lca_lab.nets.<name>
        return getattr(nets, name)(input_shape=shape, n_classes=n_classes, **kwargs)

    x = torch.randn(8, 1, 28, 28)  # the device only selects the rule; the estimate runs where x is
    lenet = build_net("lenet", (1, 28, 28), 10, padding=2)
    total, _ = saved_activation_bytes(lenet, x[:4])
    chunk = auto_chunk_size(lenet, 55000, "cuda", x)
    assert chunk * total <= GPU_CHUNK_BYTES < (chunk + 1) * total
    assert 64 < chunk < 55000
    assert auto_chunk_size(build_net("fc", (1, 28, 28), 10), 55000, "cuda", x) == 55000
    assert auto_chunk_size(build_net("fc", (1, 28, 28), 10), 100000, "cuda", x) == 65536
    bn = build_net("resnet20", (3, 32, 32), 10, width=4)
    assert auto_chunk_size(bn, 45000, "cuda", torch.randn(4, 3, 32, 32)) == 5000  # L's definition


def test_batched_points_halve_on_out_of_memory(monkeypatch):
    """A batch of points that does not fit is split (and the fitting size remembered), same numbers."""
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 9, 0.02)
    ref = list(LCAEngine(fbl, "rk4", tolerance=1e-5).steps(th, batch_points=1))
    real = fbl.loss_and_grad_batch
    sizes = []

    def limited(thetas):
        sizes.append(len(thetas))
        if len(thetas) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(thetas)

    monkeypatch.setattr(fbl, "loss_and_grad_batch", limited)
    eng = LCAEngine(fbl, "rk4", tolerance=1e-5)
    got = list(eng.steps(th, batch_points=8))
    # the first block's 9 points (θ_0 uncached) fail, then 4 fail, then 2 fit and are kept for the rest
    assert sizes[:3] == [9, 4, 2] and max(sizes[3:]) == 2 and eng._max_points == 2
    for r, s in zip(ref, got):
        assert (s.splits, s.passes) == (r.splits, r.passes)
        torch.testing.assert_close(s.param, r.param, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("method", ["first_order", "trapezoid", "rk4"])
def test_step_hands_back_the_floats_its_decision_read(method):
    """The training loop uses these instead of a second host sync per iteration."""
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 3, 0.02)
    eng = LCAEngine(fbl, method, tolerance=1e-5)
    for a, b in zip(th[:-1], th[1:]):
        st = eng.step(a, b)
        assert st.host_error == float(st.error) and st.host_loss1 == float(st.loss1)


@pytest.mark.parametrize("method", ["first_order", "trapezoid", "rk4"])
def test_launch_then_result_pipelined_equals_step(method):
    """The training loop launches step t+1 before it reads step t's result; the numbers, the refinement
    decisions and the reuse of endpoint gradients must be those of plain ``step`` calls."""
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 5, 0.05)
    ref = LCAEngine(fbl, method, tolerance=1e-5)
    plain = [ref.step(a, b) for a, b in zip(th[:-1], th[1:])]
    got, pending = pipelined_steps(LCAEngine(fbl, method, tolerance=1e-5), th)
    assert [g.passes for g in got] == [p.passes for p in plain]  # the endpoint gradients were reused alike
    if method != "first_order":
        assert max(p.splits for p in plain) > 2  # the pipelined order had refinements to make
    for g, p in zip(got, plain):
        assert g.splits == p.splits and g.converged == p.converged
        torch.testing.assert_close(g.param, p.param, rtol=0, atol=0)
        assert g.host_error == p.host_error and float(g.error) == float(p.error)
        assert abs(float(g.total) - (float(g.loss1) - float(g.loss0)) - g.host_error) < 1e-12
    assert pending.result() is got[-1]  # result() finishes once and then returns the same step


@pytest.mark.parametrize("method", ["first_order", "trapezoid", "rk4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_leaves_its_inputs_and_cached_gradients_untouched(method, dtype):
    """Regression: the in-place bookkeeping that saves kernel launches once wrote Δ into θ1 for float64
    parameters (``.double()`` of a float64 tensor is the tensor itself)."""
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=dtype)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    fbl = FullBatchLoss(model, x, y, chunk_size=16)
    engine = LCAEngine(fbl, method, tolerance=1e-9, max_splits=8)
    theta0 = fbl.flat_params()
    theta1 = theta0 + 0.2 * torch.randn_like(theta0)
    theta2 = theta1 + 0.2 * torch.randn_like(theta0)
    saved = [t.clone() for t in (theta0, theta1, theta2)]
    engine.prime(theta0)
    g0 = engine.cached_point["g"].clone()
    st1 = engine.step(theta0, theta1)
    g1 = engine.cached_point["g"].clone()
    st2 = engine.step(theta1, theta2)
    for t, s in zip((theta0, theta1, theta2), saved):
        assert torch.equal(t, s)
    assert torch.equal(st1.grad0, g0) and torch.equal(st2.grad0, g1)
    for st, a, b in ((st1, saved[0], saved[1]), (st2, saved[1], saved[2])):
        dl = fbl.loss(b) - fbl.loss(a)
        torch.testing.assert_close(st.loss1 - st.loss0, dl, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(st.total - dl, st.error, rtol=1e-6, atol=1e-9)


def test_cuda_graph_is_ignored_on_cpu_and_a_failed_recording_falls_back_with_a_warning():
    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert not FullBatchLoss(model, x, y, 20, cuda_graph=True).cuda_graph  # CPU: nothing to record
    eager = FullBatchLoss(model, x, y, 20)
    forced = FullBatchLoss(model, x, y, 20)
    forced.cuda_graph = True  # as if on a GPU: recording fails here (no CUDA device / stream)
    theta = eager.flat_params()
    with pytest.warns(RuntimeWarning, match="continuing without it"):
        L, g = forced.loss_and_grad(theta)
    assert forced.graph_error and not forced.cuda_graph
    L0, g0 = eager.loss_and_grad(theta)
    assert torch.equal(L, L0) and torch.equal(g, g0)
    assert forced.n_evals == 1  # warm-up passes of a recording are not counted as passes


class _StandInGraph:
    """What ``torch.cuda.CUDAGraph`` does for ``FullBatchLoss``, on the CPU: ``replay`` writes the pass
    at the static θ into the same static output tensors every time."""

    def __init__(self, fbl, theta):
        self.fbl, self.theta = fbl, theta
        self.L, self.g = fbl._loss_and_grad(theta)
        self.replays = 0

    def replay(self):
        L, g = self.fbl._loss_and_grad(self.theta)
        self.L.copy_(L)
        self.g.copy_(g)
        self.replays += 1


def test_graph_replay_feeds_theta_in_and_hands_out_copies_of_the_static_outputs(monkeypatch):
    """The bookkeeping around a recorded pass, with a stand-in graph on the CPU: each replay sees the θ
    it is given, results kept from one pass survive the next (the static outputs are overwritten), the
    engine's LCA equals the eager engine's, and a change of the TF32 flags records again."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    x, y = torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    eager = FullBatchLoss(model, x, y, 20)
    graphed = FullBatchLoss(model, x, y, 20)
    graphs = []

    def record(theta):
        static_theta = theta.detach().clone()
        graphs.append(_StandInGraph(graphed, static_theta))
        return graphs[-1], static_theta, graphs[-1].L, graphs[-1].g

    monkeypatch.setattr(graphed, "_record", record)
    graphed.cuda_graph = True  # as on a GPU
    t0 = eager.flat_params()
    thetas = [t0 + 0.3 * k * torch.randn_like(t0) for k in range(4)]
    kept = [graphed.loss_and_grad(t) for t in thetas]
    for t, (L, g) in zip(thetas, kept):
        L0, g0 = eager.loss_and_grad(t)
        assert torch.equal(L, L0) and torch.equal(g, g0)
    assert len(graphs) == 1 and graphs[0].replays == 4 and graphed.n_evals == 4
    assert not torch.equal(kept[0][1], kept[1][1])
    a = LCAEngine(eager, "rk4", tolerance=1e-9).step(thetas[0], thetas[1])
    b = LCAEngine(graphed, "rk4", tolerance=1e-9).step(thetas[0], thetas[1])
    assert a.splits == b.splits > 1 and torch.equal(a.param, b.param) and torch.equal(a.error, b.error)
    with matmul_precision("tf32" if not torch.backends.cuda.matmul.allow_tf32 else "fp32"):
        L, g = graphed.loss_and_grad(thetas[2])
    assert len(graphs) == 2 and torch.equal(g, kept[2][1])
    assert graphed.graph_error is None


class _Tied(nn.Module):
    """Two layers that share one weight: named_parameters() lists it once, as ``a.weight``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("batched", [False, True])
def test_tied_weights_take_theta_in_every_place_they_are_used(batched):
    """A parameter registered under two names is one entry of θ and moves in both places: L, ∇L (the
    sum over both uses) and the LCA equal the plain model's at the same values."""
    torch.manual_seed(0)
    model = _Tied().double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    fbl = FullBatchLoss(model, x, y, chunk_size=16)
    assert fbl.param_names == ["a.weight", "a.bias", "b.bias", "head.weight", "head.bias"]
    theta = fbl.flat_params() + 0.3 * torch.randn(fbl.n_params, dtype=torch.float64)
    if batched:
        L, g = fbl.loss_and_grad_batch(theta[None])
        L, g = L[0], g[0]
    else:
        L, g = fbl.loss_and_grad(theta)
    plain = copy.deepcopy(model)  # the deep copy keeps the tie
    with torch.no_grad():
        for p, v in zip(plain.parameters(), theta.split(fbl.numels)):
            p.copy_(v.view_as(p))
    loss = F.cross_entropy(plain(x), y)
    loss.backward()
    assert float(L) == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in plain.parameters()]))
    assert float(fbl.loss(theta)) == pytest.approx(loss.item(), rel=1e-12)
    st = LCAEngine(fbl, tolerance=1e-8).step(fbl.flat_params(), theta)
    assert st.converged and abs(float(st.total) - (float(st.loss1) - float(st.loss0))) < 1e-8


def test_compiled_passes_equal_the_eager_ones_and_conserve():
    """FullBatchLoss(compile=True): torch.compile (its CPU backend here) gives eager's L and ∇L to float64
    rounding, with BatchNorm's batch statistics (what the fusion changes on a GPU), and an RK4 step on it
    conserves as the eager one does."""
    torch.manual_seed(0)
    x = torch.randn(120, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)).double()
    eager = FullBatchLoss(model, x, y, chunk_size=40)
    compiled = FullBatchLoss(model, x, y, chunk_size=40, compile=True)
    t0 = eager.flat_params()
    t1 = t0 + 0.01 * torch.randn_like(t0)
    for th in (t0, t1):
        (La, ga), (Lb, gb) = eager.loss_and_grad(th), compiled.loss_and_grad(th)
        assert compiled.compile_error is None and compiled._compile_ok
        torch.testing.assert_close(Lb, La, rtol=0, atol=1e-13)
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-13)
    a = LCAEngine(eager, tolerance=1e-5).step(t0, t1)
    b = LCAEngine(compiled, tolerance=1e-5).step(t0, t1)
    assert a.splits == b.splits and b.converged and abs(b.host_error) <= 1e-5
    torch.testing.assert_close(b.param, a.param, rtol=0, atol=1e-13)


def test_a_failed_compile_warns_and_the_eager_pass_runs(monkeypatch):
    import lca_lab.lca as lca_mod

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(lca_mod.torch, "compile", broken)
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80, compile=True)
    th = fbl.flat_params()
    with pytest.warns(RuntimeWarning, match="lca.compile: compiling the full-data pass failed"):
        L, g = fbl.loss_and_grad(th)
    assert "no C++ compiler" in fbl.compile_error and not fbl.compile
    L0, g0 = FullBatchLoss(model, x, y, chunk_size=80).loss_and_grad(th)
    assert torch.equal(L, L0) and torch.equal(g, g0)


def test_a_pending_step_that_failed_raises_again_instead_of_returning_nothing(monkeypatch):
    """Regression: a second result() after an error while finishing (a refinement pass) returned None."""
    model, x, y = _tanh_problem()
    fbl = FullBatchLoss(model, x, y, chunk_size=80)
    th = _trajectory(fbl, 1, 0.3)
    eng = LCAEngine(fbl, "trapezoid", tolerance=1e-12)  # the trapezoid misses: a midpoint pass follows
    pending = eng.launch(th[0], th[1])
    monkeypatch.setattr(fbl, "loss_and_grad", lambda theta: (_ for _ in ()).throw(MemoryError("refine")))
    for _ in range(2):
        with pytest.raises(MemoryError, match="refine"):
            pending.result()
