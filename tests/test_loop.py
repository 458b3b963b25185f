"""The one loop (lca_lab.loop): the pipelined driver's drain points, the recorder's sums and their state."""

import pytest
import torch
import torch.nn.functional as F

from lca_lab.lca import FullBatchLoss, LayerSums, LCAEngine
from lca_lab.loop import LCADriver, RunningSums, StepRecorder, lca_summary
from lca_lab.reducers import LCAReducer


def _problem(fail_at=None):
    """A small softmax regression trained by SGD, its engine and a recorder without a run file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    fbl = FullBatchLoss(model, x, y, chunk_size=40)
    index = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor(fbl.numels))  # weight, bias
    engine = LCAEngine(fbl, "rk4", tolerance=1e-4, layer_sums=LayerSums(index, 2))
    recorder = StepRecorder(LCAReducer(index, 2, engine.layer_sums), layer_names=["w", "b"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def step(t):
        if t == fail_at:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return engine, recorder, step, fbl.flat_params


class _Rows:
    """A boundary every ``every`` iterations that notes how many rows were recorded when it ran."""

    def __init__(self, recorder, every):
        self.recorder, self.every, self.seen = recorder, every, []

    def due(self, it):
        return it % self.every == 0

    def __call__(self, it):
        self.seen.append((it, self.recorder.reducer.iterations))


def test_boundaries_and_the_window_end_see_every_row_so_far():
    engine, recorder, step, flat = _problem()
    driver = LCADriver(engine, recorder, flat, window=(2, 7))
    rows = _Rows(recorder, 3)
    driver.train(range(10), step, [rows])
    # before iteration 3: steps 2 done (1 row); 6: steps 2..5 (4 rows); 9: the window [2, 7) ended (5 rows)
    assert rows.seen == [(3, 1), (6, 4), (9, 5)]
    s = lca_summary(recorder.sums, 5, recorder.layer_names)
    assert s["not_converged"] == 0 and s["L_end"] < s["L_start"]
    assert sum(s["layer_lca"].values()) == pytest.approx(s["L_end"] - s["L_start"] + s["cumulative_error"])


def test_an_error_in_a_training_step_records_the_launched_step_first():
    engine, recorder, step, flat = _problem(fail_at=3)
    driver = LCADriver(engine, recorder, flat)
    with pytest.raises(KeyboardInterrupt):
        driver.train(range(10), step)
    assert recorder.reducer.iterations == 3 and driver.pending is None  # steps 0, 1, 2: none lost


def test_running_sums_keep_the_checkpoints_keys_and_restore():
    engine, recorder, step, flat = _problem()
    LCADriver(engine, recorder, flat).train(range(4), step)
    state = recorder.state_dict()
    assert set(state) == {"reducer", "loop"}
    assert set(state["loop"]) == {
        "counts", "layer_total", "max_abs_err", "not_converged", "total_splits", "passes", "loss_start",
        "loss_end", "cum_err",
    }  # fmt: skip
    other = _problem()[1]
    other.load_state_dict(state)
    assert lca_summary(other.sums, 4, ["w", "b"]) == lca_summary(recorder.sums, 4, ["w", "b"])
    assert torch.equal(other.reducer.last_motion, recorder.reducer.last_motion)


def test_summary_from_stored_rows_matches_the_running_sums():
    engine, recorder, step, flat = _problem()
    steps = []
    driver = LCADriver(engine, recorder, flat)
    driver.train(range(6), step, after=lambda it, launched: steps.append(launched))
    sts = [launched.handle.result() for launched in steps]
    rows = {
        "loss": torch.stack([sts[0].loss0] + [s.loss1 for s in sts]).numpy(),
        "error": torch.stack([s.error for s in sts]).numpy(),
        "splits": torch.tensor([s.splits for s in sts]).numpy(),
        "converged": torch.tensor([s.converged for s in sts]).numpy(),
        "passes": torch.tensor([s.passes for s in sts]).numpy(),
    }
    reducer = LCAReducer(recorder.reducer.index, 2)
    views = [reducer.update(s.param, s.delta, s.grad0) for s in sts]
    for key, name in (("fh", "frac_helping"), ("fu", "frac_hurting"), ("fz", "frac_zero")):
        rows[key] = torch.stack([v[name] for v in views]).numpy()
    online, stored = lca_summary(recorder.sums, 6), lca_summary(RunningSums.from_rows(rows), 6)
    assert stored.keys() == online.keys()
    for k, v in online.items():
        assert stored[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
