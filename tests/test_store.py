"""Tests of the HDF5 run file: round trip, optional datasets, failure status, crash safety, size estimate."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lca_lab.store import NotStoredError, RunWriter, estimate_bytes, open_run

# K = 7 scalars in 2 tensors, 2 layers.
NAMES = ["fc.weight", "fc.bias"]
SHAPES = [(2, 3), (1,)]
LAYERS = [0, 1]
LAYER_NAMES = ["fc_w", "fc_b"]
K = 7
ATTRS = {
    "config": "net: fc\nopt: sgd\n",
    "lca_lab_version": "0.1.0",
    "git_sha": None,  # no git: attribute left out
    "torch_version": torch.__version__,
    "device": "cpu",
    "data_source": "synthetic",
    "created": "2025-01-01T00:00:00",
}


def _writer(path: Path, **kw) -> RunWriter:
    return RunWriter(
        path,
        param_names=NAMES,
        param_shapes=SHAPES,
        param_layer=LAYERS,
        layer_names=LAYER_NAMES,
        attrs=ATTRS,
        **kw,
    )


def _rows(T: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic run data: rows with distinct values so misaligned writes would show."""
    rng = np.random.default_rng(seed)
    param = rng.standard_normal((T, K)).astype(np.float32)
    layer = np.stack([param[:, :6].sum(1), param[:, 6:].sum(1)], axis=1).astype(np.float64)
    return {
        "loss": rng.random(T + 1) + 1.0,
        "param": param,
        "layer": layer,
        "total": layer.sum(1),
        "error": rng.standard_normal(T) * 1e-4,
        "splits": rng.integers(1, 33, T).astype(np.int32),
        "converged": rng.random(T) > 0.2,
        "iteration": np.arange(T, dtype=np.int64) + 100,
        "theta": rng.standard_normal((T + 1, K)).astype(np.float32),
    }


def _write(
    w: RunWriter,
    d: dict[str, np.ndarray],
    *,
    as_tensors: bool = False,
    per_param: bool = True,
    trajectory: bool = False,
    start: int = 0,
    stop: int | None = None,
) -> None:
    conv = torch.as_tensor if as_tensors else (lambda x: x)
    stop = len(d["total"]) if stop is None else stop
    if start == 0:
        w.write_initial(conv(d["loss"][0]), conv(d["theta"][0]) if trajectory else None)
    for t in range(start, stop):
        w.append(
            int(d["iteration"][t]),
            conv(d["loss"][t + 1]),
            conv(d["total"][t]),
            float(d["error"][t]),
            conv(d["splits"][t]),
            bool(d["converged"][t]),
            conv(d["layer"][t]),
            param=conv(d["param"][t]) if per_param else None,
            theta_next=conv(d["theta"][t + 1]) if trajectory else None,
        )


@pytest.mark.parametrize("background", [False, True, "process"])  # process: train.py's way on a GPU
@pytest.mark.parametrize("as_tensors", [False, True])
def test_round_trip(tmp_path: Path, as_tensors: bool, background: bool | str) -> None:
    d = _rows(23)
    path = tmp_path / "lca.h5"
    bg = {"background": bool(background), "file_process": background == "process"}
    with _writer(path, flush_every=5, trajectory=True, **bg) as w:
        _write(w, d, as_tensors=as_tensors, trajectory=True)
        w.append_eval(0, test_loss=2.5, test_acc=0.1)
        w.append_eval(10, test_loss=torch.tensor(1.5), test_acc=0.6, train_acc=0.7)
        w.write_array("data/train_index", np.arange(10, dtype=np.int64))
        w.set_attr("wandb_id", "abc123")

    with open_run(tmp_path) as r:  # a run directory works as well as the file
        assert r.status == "complete" and r.is_complete
        assert r.config == ATTRS["config"]
        attrs = r.attrs
        assert attrs["device"] == "cpu" and attrs["wandb_id"] == "abc123" and "git_sha" not in attrs
        assert r.param_names == NAMES and r.param_shapes == SHAPES and r.layer_names == LAYER_NAMES
        assert r.param_layer.tolist() == LAYERS and r.param_layer.dtype == np.int64
        assert r.n_params == K and r.n_rows == 23
        np.testing.assert_array_equal(r.train_loss, d["loss"])
        np.testing.assert_array_equal(r.lca_total, d["total"])
        np.testing.assert_array_equal(r.lca_error, d["error"])
        np.testing.assert_array_equal(r.lca_layer, d["layer"])
        np.testing.assert_array_equal(r.lca_splits, d["splits"])
        np.testing.assert_array_equal(r.lca_converged, d["converged"])
        np.testing.assert_array_equal(r.lca_iteration, d["iteration"])
        assert r.lca_total.dtype == np.float64 and r.lca_converged.dtype == np.bool_
        np.testing.assert_array_equal(r.param_lca(), d["param"])
        assert r.param_lca().dtype == np.float32
        np.testing.assert_array_equal(r.param_lca(slice(3, 9)), d["param"][3:9])
        np.testing.assert_array_equal(r.param_lca(-1), d["param"][-1])
        np.testing.assert_array_equal(r.param_lca([5, 1, 5]), d["param"][[5, 1, 5]])
        np.testing.assert_array_equal(r.theta(), d["theta"])

        by_name = r.layer_param_lca("fc_w", slice(2, 4))
        assert list(by_name) == ["fc.weight"]
        np.testing.assert_array_equal(by_name["fc.weight"], d["param"][2:4, :6].reshape(2, 2, 3))
        bias = r.layer_param_lca(1)["fc.bias"]
        assert bias.shape == (23, 1)
        np.testing.assert_array_equal(bias[:, 0], d["param"][:, 6])

        np.testing.assert_array_equal(r.eval("iteration"), [0, 10])
        np.testing.assert_array_equal(r.eval("test_loss"), [2.5, 1.5])
        np.testing.assert_array_equal(r.eval("train_acc"), [np.nan, 0.7])
        np.testing.assert_array_equal(r.train_index, np.arange(10))


def test_file_layout_names(tmp_path: Path) -> None:
    """The names and dtypes of the contract in design.md, read with plain h5py."""
    d = _rows(4)
    path = tmp_path / "run" / "lca.h5"
    with _writer(path, n_classes=3, flush_every=2) as w:
        w.write_initial(d["loss"][0])
        for t in range(4):
            w.append(
                t,
                d["loss"][t + 1],
                d["total"][t],
                d["error"][t],
                1,
                True,
                d["layer"][t],
                param=d["param"][t],
                class_layer=np.full((3, 2), float(t)),
            )
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        expected = {
            "params/names": None,
            "params/shapes": None,
            "params/layer": np.int64,
            "layers/names": None,
            "train/loss": np.float64,
            "lca/param": np.float32,
            "lca/layer": np.float64,
            "lca/total": np.float64,
            "lca/error": np.float64,
            "lca/splits": np.int32,
            "lca/converged": np.bool_,
            "lca/iteration": np.int64,
            "lca/class_layer": np.float64,
        }
        for name, dtype in expected.items():
            assert name in f, name
            if dtype is not None:
                assert f[name].dtype == dtype, name
        assert f["params/shapes"].asstr()[()].tolist() == ["(2, 3)", "(1,)"]
        assert f["lca/param"].shape == (4, K) and f["train/loss"].shape == (5,)
        assert f["lca/class_layer"].shape == (4, 3, 2)
        assert "trajectory/theta" not in f
    with open_run(path) as r:
        np.testing.assert_array_equal(r.lca_class_layer[:, 0, 0], [0.0, 1.0, 2.0, 3.0])


def test_without_per_param(tmp_path: Path) -> None:
    d = _rows(6)
    with _writer(tmp_path / "lca.h5", per_param=False, flush_every=4) as w:
        _write(w, d, per_param=False)
    with open_run(tmp_path / "lca.h5") as r:
        assert "lca/param" not in r.h5 and not r.per_param
        np.testing.assert_array_equal(r.lca_layer, d["layer"])
        with pytest.raises(NotStoredError, match=r"store\.per_param=true"):
            r.param_lca()
        with pytest.raises(NotStoredError, match=r"store\.per_param=true"):
            r.layer_param_lca(0)
        with pytest.raises(NotStoredError, match=r"store\.trajectory=true"):
            r.theta()


def test_exception_marks_failed_and_keeps_buffered_rows(tmp_path: Path) -> None:
    d = _rows(13)
    with pytest.raises(ValueError, match="boom"):
        with _writer(tmp_path / "lca.h5", flush_every=5) as w:
            _write(w, d)  # 13 rows: 10 flushed, 3 only in the buffer
            raise ValueError("boom")
    with open_run(tmp_path) as r:
        assert r.status.startswith("failed:") and r.status == "failed: ValueError: boom"
        assert not r.is_complete
        assert r.n_rows == 13
        np.testing.assert_array_equal(r.param_lca(), d["param"])
        np.testing.assert_array_equal(r.train_loss, d["loss"])


def test_tensor_rows_are_snapshots(tmp_path: Path) -> None:
    """A caller that reuses one accumulator tensor in place must not change buffered rows."""
    with _writer(tmp_path / "lca.h5", flush_every=100) as w:
        w.write_initial(torch.tensor(1.0))
        acc = torch.zeros(K, dtype=torch.float64)
        total = torch.zeros((), dtype=torch.float64)
        for t in range(3):
            acc.fill_(t)
            total.fill_(t)
            w.append(t, 1.0, total, 0.0, 2, True, torch.zeros(2), param=acc)
    with open_run(tmp_path) as r:
        np.testing.assert_array_equal(r.param_lca()[:, 0], [0, 1, 2])
        np.testing.assert_array_equal(r.lca_total, [0, 1, 2])


def test_refuses_to_overwrite_and_checks_shapes(tmp_path: Path) -> None:
    path = tmp_path / "lca.h5"
    _writer(path).close()
    with pytest.raises(FileExistsError):
        _writer(path)
    w = _writer(path, overwrite=True)
    with pytest.raises(RuntimeError, match="write_initial"):
        w.append(0, 1.0, 0.0, 0.0, 1, True, np.zeros(2), param=np.zeros(K))
    w.write_initial(1.0)
    with pytest.raises(ValueError, match="param has 6 elements"):
        w.append(0, 1.0, 0.0, 0.0, 1, True, np.zeros(2), param=np.zeros(6))
    w.close()
    with open_run(path) as r:
        assert r.n_rows == 0 and r.status == "complete" and r.param_lca().shape == (0, K)


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from lca_lab.store import RunWriter
    w = RunWriter(sys.argv[1], param_names=["w", "b"], param_shapes=[(2, 3), (1,)], param_layer=[0, 1],
                  layer_names=["w", "b"], attrs={"config": "x: 1\\n"}, flush_every=5, trajectory=True)
    w.write_initial(0.0, np.zeros(7))
    for t in range(23):  # rows 20..22 stay in the buffer
        w.append(t, float(t + 1), float(t), 0.0, 2, True, np.full(2, t), param=np.full(7, t),
                 theta_next=np.full(7, t + 1))
        if t == 19:
            print("flushed", flush=True)
    time.sleep(120)
    """
)


def test_killed_writer_leaves_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "lca.h5"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "flushed", line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(path, "r") as f:  # plain HDF5 opens it: no "file is already open for write" flag
        assert f.attrs["status"] == "running"
        assert f["lca/iteration"].shape[0] >= 20
    with open_run(path) as r:
        assert r.status == "running" and not r.is_complete
        assert r.n_rows == 20
        np.testing.assert_array_equal(r.lca_iteration, np.arange(20))
        np.testing.assert_array_equal(r.param_lca()[:, 0], np.arange(20))
        np.testing.assert_array_equal(r.train_loss, np.arange(21))
        np.testing.assert_array_equal(r.theta()[:, 0], np.arange(21))


READER = textwrap.dedent(
    """
    import sys
    from lca_lab.store import open_run
    r = open_run(sys.argv[1])
    print(r.status, r.n_rows, flush=True)
    for line in sys.stdin:  # the parent writes more rows, then asks for a refresh
        r.refresh()
        print(r.status, r.n_rows, flush=True)
    r.close()
    """
)


def test_reader_in_other_process_while_writing(tmp_path: Path) -> None:
    """A reader (a notebook) may hold the file open while the run keeps flushing rows."""
    d = _rows(12)
    w = _writer(tmp_path / "lca.h5", flush_every=5)
    _write(w, d, stop=7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().split() == ["running", "5"]
        _write(w, d, start=7)  # flushes row 10 while the reader holds the file open
        proc.stdin.write("refresh\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["running", "10"]
        w.close()
        proc.stdin.write("refresh\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["complete", "12"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    with open_run(tmp_path) as r:
        np.testing.assert_array_equal(r.param_lca(), d["param"])


def test_reader_in_same_process_blocks_flush_with_clear_error(tmp_path: Path) -> None:
    d = _rows(6)
    w = _writer(tmp_path / "lca.h5", flush_every=100)
    _write(w, d, stop=3)
    r = open_run(tmp_path)
    with pytest.raises(RuntimeError, match="Close the reader first"):
        w.flush()
    r.close()
    _write(w, d, start=3)
    w.close()  # the rows kept in the buffer are written now
    with open_run(tmp_path) as r:
        np.testing.assert_array_equal(r.param_lca(), d["param"])


@pytest.mark.parametrize("expected_rows", [200, None])
def test_estimate_bytes(tmp_path: Path, expected_rows: int | None) -> None:
    n, T, n_layers = 10_000, 200, 3
    names, shapes = ["a", "b", "c"], [(50, 100), (100, 40), (1000,)]
    rng = np.random.default_rng(0)
    path = tmp_path / "lca.h5"
    with RunWriter(
        path,
        param_names=names,
        param_shapes=shapes,
        param_layer=[0, 1, 2],
        layer_names=names,
        attrs=ATTRS,
        flush_every=50,
        expected_rows=expected_rows,
    ) as w:
        w.write_initial(1.0)
        for t in range(T):
            w.append(
                t,
                1.0,
                0.0,
                0.0,
                2,
                True,
                rng.standard_normal(n_layers),
                param=rng.standard_normal(n).astype(np.float32),
            )
    real = path.stat().st_size
    est = estimate_bytes(n, T, per_param=True, trajectory=False, n_layers=n_layers)
    assert math.isclose(est, real, rel_tol=0.10), (est, real)
    assert est >= T * n * 4
    # trajectory roughly doubles it; per_param off removes the dominant term
    assert estimate_bytes(n, T, True, True, n_layers) > 1.9 * est
    assert estimate_bytes(n, T, False, False, n_layers) < 0.05 * est


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def test_background_write_error_surfaces_and_rows_are_retried(tmp_path: Path, monkeypatch) -> None:
    """Disk full in the writer thread: the next flush raises it, and no row is lost or duplicated."""
    import concurrent.futures
    import errno

    import lca_lab.store.transport as transport

    d = _rows(12)
    real = transport.write_rows
    fail = {"left": 1}

    def flaky(ds, offset, arr):
        if ds.name == "/lca/param" and fail["left"]:
            fail["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(ds, offset, arr)

    monkeypatch.setattr(transport, "write_rows", flaky)
    w = _writer(tmp_path / "lca.h5", flush_every=4, background=True)
    _write(w, d, stop=4)  # first flush goes to the thread and fails there
    concurrent.futures.wait([w.transport.future])  # let the thread fail (test only)
    with pytest.raises(OSError, match="No space"):
        _write(w, d, start=4, stop=8)
    _write(w, d, start=8, stop=12)  # "space freed": the queued rows are written with the new ones
    w.close()
    with open_run(tmp_path) as r:
        assert r.status == "complete" and r.n_rows == 12
        np.testing.assert_array_equal(r.param_lca(), d["param"])
        np.testing.assert_array_equal(r.lca_iteration, d["iteration"])
        np.testing.assert_array_equal(r.train_loss, d["loss"])


@pytest.mark.gpu
def test_background_writer_casts_float64_gpu_rows_on_the_device(tmp_path: Path) -> None:
    """float64 per-parameter rows handed over fresh wait uncast on the GPU and leave it as float32 (one
    cast per flush); the file equals the blocking writer's and the rows rounded once to float32."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(K, dtype=torch.float64, generator=g).cuda() for _ in range(7)]
    for bg, proc in ((False, False), (True, False), (True, True)):  # plain, writer thread, its process
        with _writer(tmp_path / f"{bg}{proc}.h5", flush_every=3, background=bg, file_process=proc) as w:
            w.write_initial(torch.tensor(1.0, dtype=torch.float64, device="cuda"))
            for t, p in enumerate(params):
                layer = torch.stack([p[:3].sum(), p[3:].sum()])
                w.append(t, p.sum(), p.sum(), p[0], 2, True, layer, p, copy=False)
                assert t % 3 == 2 or w.buffer.rows["param"][-1].dtype == torch.float64  # uncast until flushed
    a = _datasets(tmp_path / "FalseFalse.h5")
    for name in ("TrueFalse.h5", "TrueTrue.h5"):
        b = _datasets(tmp_path / name)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
        np.testing.assert_array_equal(b["lca/param"], torch.stack(params).float().cpu().numpy())


@pytest.mark.gpu
def test_background_writer_from_gpu_rows_equals_blocking_writer(tmp_path: Path) -> None:
    """The fast path (pinned, non-blocking copies; writer thread, and its child process as train.py uses it)
    writes exactly what the plain path does."""
    d = _rows(23)
    cuda = {k: torch.as_tensor(v).cuda() for k, v in d.items()}
    for bg, proc in ((False, False), (True, False), (True, True)):  # plain, writer thread, its process
        with _writer(
            tmp_path / f"{bg}{proc}.h5", flush_every=5, trajectory=True, background=bg, file_process=proc
        ) as w:
            _write(w, cuda, as_tensors=True, trajectory=True)
    a = _datasets(tmp_path / "FalseFalse.h5")
    for name in ("TrueFalse.h5", "TrueTrue.h5"):
        b = _datasets(tmp_path / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")


def test_copy_false_buffers_fresh_tensors_and_copy_true_snapshots_reused_ones(
    tmp_path: Path, monkeypatch
) -> None:
    """append(copy=True) snapshots a tensor the caller goes on modifying (an accumulator); copy=False
    buffers the caller's fresh tensors themselves (no copy kernel), a float64 per-parameter row still cast
    to float32 by a copy, so the stored rows are the values appended either way."""
    acc = torch.zeros(2, dtype=torch.float64)  # reused in place, as a running per-layer sum would be
    want_layer, want_param = [], []
    with _writer(tmp_path / "a.h5", flush_every=100) as w:
        w.write_initial(1.0)
        for t in range(3):
            acc += torch.tensor([1.0, 2.0], dtype=torch.float64)
            param = torch.arange(K, dtype=torch.float64) * (t + 1)
            w.append(t, 1.0 - t, acc.sum(), 0.0, 2, True, acc, param)  # copy=True: acc is snapshot
            want_layer.append(acc.clone().numpy())
            want_param.append(param.float().numpy())
            fresh_layer = acc * 10  # a new tensor every iteration, never modified afterwards
            w.append_dataset("extra/layer", fresh_layer, copy=False)
            assert w.buffer.series["extra/layer"][1][-1].data_ptr() == fresh_layer.data_ptr()  # not copied
        assert w.buffer.rows["layer"][-1].data_ptr() != acc.data_ptr()  # the accumulator was copied
    with h5py.File(tmp_path / "a.h5") as f:
        np.testing.assert_array_equal(f["lca/layer"][:], np.stack(want_layer))
        np.testing.assert_array_equal(f["lca/param"][:], np.stack(want_param))
        np.testing.assert_array_equal(f["extra/layer"][:], 10 * np.stack(want_layer))
    # float64 rows for a float32 dataset: handed over fresh and small, they wait uncast for the flush (one
    # cast kernel per flush); copied, or over DEFER_CAST_BYTES per flush, they are cast at once.
    param = (torch.arange(K, dtype=torch.float64) + 1) / 3  # not representable in float32
    for name, copy, limit, buffered_as in [
        ("b.h5", False, RunWriter.DEFER_CAST_BYTES, torch.float64),
        ("c.h5", True, RunWriter.DEFER_CAST_BYTES, torch.float32),
        ("d.h5", False, 100 * K * 4 - 1, torch.float32),
    ]:
        monkeypatch.setattr(RunWriter, "DEFER_CAST_BYTES", limit)
        with _writer(tmp_path / name, flush_every=100) as w:
            w.write_initial(1.0)
            w.append(0, 0.5, param.sum(), 0.0, 2, True, torch.ones(2, dtype=torch.float64), param, copy=copy)
            buffered = w.buffer.rows["param"][-1]
            assert buffered.dtype == buffered_as, name
            assert (buffered.data_ptr() == param.data_ptr()) == (buffered_as == torch.float64)
        with h5py.File(tmp_path / name) as f:
            assert f["lca/param"].dtype == np.float32
            np.testing.assert_array_equal(f["lca/param"][0], param.numpy().astype(np.float32), err_msg=name)


def test_in_flight_rows_buffered_as_float64_leave_the_device_as_float32(tmp_path: Path, monkeypatch) -> None:
    """Per-parameter rows that waited uncast (float64) are cast on the device when a flush stacks them: the
    staging buffer is float32 (half the bytes to copy) and the file equals the blocking writer's."""
    import lca_lab.store.buffer as buffer

    monkeypatch.setattr(buffer, "can_fly", lambda rows: bool(rows) and all(torch.is_tensor(x) for x in rows))
    staged = []
    real = buffer.InFlight

    class Seen(real):
        def __init__(self, stacked, *a, **k):
            staged.append(stacked.dtype)
            super().__init__(stacked, *a, **k)

    monkeypatch.setattr(buffer, "InFlight", Seen)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(K, dtype=torch.float64, generator=g) for _ in range(5)]
    for name, background in (("plain.h5", False), ("bg.h5", True)):
        with _writer(tmp_path / name, flush_every=2, background=background) as w:
            w.write_initial(torch.tensor(1.0, dtype=torch.float64))
            for t, p in enumerate(params):
                layer = torch.stack([p[:3].sum(), p[3:].sum()])
                w.append(t, p.sum(), p.sum(), p[0], 2, True, layer, p, copy=False)
    assert staged and torch.float32 in staged and torch.float64 in staged  # param narrowed, total not
    a, b = _datasets(tmp_path / "plain.h5"), _datasets(tmp_path / "bg.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(b["lca/param"], torch.stack(params).float().numpy())


def test_staging_buffers_are_reserved_at_each_series_first_row_and_serve_every_flush(
    tmp_path: Path, monkeypatch
) -> None:
    """A background writer allocates the staging buffers of two flushes when each series' first row comes,
    so that no flush in the loop allocates pinned memory: neither the steady ones, nor the short ones (the
    first flush, triggered by a series that holds a row 0; the tail at close), while the writer thread
    keeps up. In-flight path with CPU tensors, as in the test below; the file equals the blocking one's."""
    import lca_lab.store.buffer as buffer

    monkeypatch.setattr(buffer, "can_fly", lambda rows: bool(rows) and all(torch.is_tensor(x) for x in rows))
    g = torch.Generator().manual_seed(0)
    T, fe = 11, 4
    params = [torch.randn(K, dtype=torch.float64, generator=g) for _ in range(T)]
    reserved = None
    for bg in (False, True):
        with _writer(tmp_path / f"{bg}.h5", flush_every=fe, trajectory=True, background=bg) as w:
            w.write_initial(torch.tensor(1.0, dtype=torch.float64), torch.zeros(K))
            w.append_dataset("test/loss", torch.tensor(2.0, dtype=torch.float64))  # row 0: T+1 rows
            for t, p in enumerate(params):
                w.append_dataset("reduce/x", p[:3].float(), copy=False)
                w.append_dataset("test/loss", p.sum())
                layer = torch.stack([p[:3].sum(), p[3:].sum()])
                w.append(t, p.sum(), p.sum(), p[0], 2, True, layer, p, theta_next=p.float(), copy=False)
                if bg:
                    while w.transport.pending:  # the writer thread keeps up
                        time.sleep(0.001)
                    if t == 0:
                        reserved = w.buffer.staging.allocated
            pool = w.buffer.staging
        if bg:
            # total, error, layer, param, loss, theta, reduce/x and test/loss: two buffers each
            assert reserved == 2 * 8
            assert pool.allocated == reserved  # no flush allocated, the short first and last included
    # a series whose flushes are big gets one buffer: its flushes are far apart, and pinned memory counts
    monkeypatch.setattr(buffer.StagingPool, "SECOND_BELOW", fe * K * 4 - 1)
    with _writer(tmp_path / "big.h5", flush_every=fe, background=True) as w:
        w.write_initial(torch.tensor(1.0, dtype=torch.float64))
        w.append(0, params[0].sum(), params[0].sum(), params[0][0], 2, True, params[0][:2], params[0])
        assert w.buffer.staging.allocated == 2 * 4 + 1  # loss, total, error, layer: two; param: one
    a, b = _datasets(tmp_path / "False.h5"), _datasets(tmp_path / "True.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(b["lca/param"], torch.stack(params).float().numpy())
    assert len(b["test/loss"]) == T + 1


def test_staging_pool_hands_out_the_smallest_buffer_that_holds_the_rows() -> None:
    """A flush of n rows takes the smallest free buffer of ≥ n rows of its row shape and dtype, as a view
    of its first n rows, and a new one only if none holds them; buffers are told apart by identity (== on
    tensors compares values: a free list of equal buffers must not hand out the wrong one)."""
    from lca_lab.store.buffer import StagingPool as _StagingPool

    pool = _StagingPool()
    pool.reserve((3,), torch.float32, 5)  # two buffers of 5 rows
    big = pool._free[((3,), torch.float32)][0]
    small = torch.zeros(3, 3)
    pool.give(small)  # a buffer of 3 rows, after the 5-row ones; every buffer holds zeros
    buf, view = pool.take((2, 3), torch.float32)
    assert buf is small and view.shape == (2, 3) and view.data_ptr() == small.data_ptr()
    buf, view = pool.take((4, 3), torch.float32)
    assert buf.shape == (5, 3) and view.shape == (4, 3)
    pool.give(buf)
    assert pool.allocated == 2
    buf, _ = pool.take((6, 3), torch.float32)  # none holds 6 rows
    assert buf.shape == (6, 3) and pool.allocated == 3
    buf, _ = pool.take((2, 3), torch.float64)  # nor any other dtype
    assert pool.allocated == 4
    assert any(b is big for b in pool._free[((3,), torch.float32)])


def test_staging_buffers_are_reused_only_after_their_rows_are_written(tmp_path: Path, monkeypatch) -> None:
    """The background writer's staging buffers (pinned on a GPU) come back to the pool only once their
    rows are in the file. Exercised here through the in-flight path with CPU tensors and a slow disk, so
    that flushes pile up behind the writer thread: a buffer handed out again too early would be overwritten
    before its rows were written, and the file would differ from the blocking writer's."""
    import lca_lab.store.buffer as buffer
    import lca_lab.store.transport as transport

    monkeypatch.setattr(buffer, "can_fly", lambda rows: bool(rows) and all(torch.is_tensor(x) for x in rows))
    write_rows = transport.write_rows

    def slow(ds, offset, arr):
        time.sleep(0.01)
        write_rows(ds, offset, arr)

    monkeypatch.setattr(transport, "write_rows", slow)
    d = _rows(40)
    tensors = {k: torch.as_tensor(v) for k, v in d.items()}
    with _writer(tmp_path / "plain.h5", flush_every=3, trajectory=True) as w:
        _write(w, tensors, as_tensors=True, trajectory=True)
    with _writer(tmp_path / "bg.h5", flush_every=3, trajectory=True, background=True) as w:
        flights = []
        real = buffer.InFlight

        class Counted(real):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                flights.append(self)

        monkeypatch.setattr(buffer, "InFlight", Counted)
        pool = w.buffer.staging
        _write(w, tensors, as_tensors=True, trajectory=True, stop=20)  # flushes pile up behind the writer
        while w.transport.pending:  # the writer catches up: every buffer back in the pool
            time.sleep(0.01)
        n1, a1 = len(flights), pool.allocated
        _write(w, tensors, as_tensors=True, trajectory=True, start=20)
    a, b = _datasets(tmp_path / "plain.h5"), _datasets(tmp_path / "bg.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(flights) > 50 and all(f.host is None for f in flights)  # every buffer came back
    assert pool.allocated - a1 < len(flights) - n1  # and buffers of the first flushes served later ones
