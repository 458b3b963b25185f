"""The run-file layout is described once (``lca_lab.store.layout``): what the writer writes, what the
reader counts and what ``check_layout`` accepts all follow that one table."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from lca_lab.store import SERIES, Layout, MalformedRunFileError, RunWriter, check_layout, open_run
from lca_lab.store.layout import COMMIT, EVAL_NAMES, TABLES, write_order

NAMES, SHAPES, LAYER, LAYER_NAMES = ["w", "b"], [(3, 4), (3,)], [0, 1], ["w", "b"]
K, N_CLASSES, T = 15, 5, 7


def _write(path: Path, per_param: bool, trajectory: bool, n_classes: int | None) -> RunWriter:
    rng = np.random.default_rng(0)
    with RunWriter(
        path, param_names=NAMES, param_shapes=SHAPES, param_layer=LAYER, layer_names=LAYER_NAMES,
        attrs={"config": "test"}, per_param=per_param, trajectory=trajectory, n_classes=n_classes,
        flush_every=3,
    ) as w:  # fmt: skip
        w.write_initial(1.0, rng.random(K) if trajectory else None)
        for t in range(T):
            w.append(
                t, 1.0 - t / 10, 0.1, 1e-5, 2, True, rng.random(2), rng.random(K) if per_param else None,
                rng.random(K) if trajectory else None, rng.random(N_CLASSES * 2) if n_classes else None,
            )  # fmt: skip
            w.append_dataset("extra/series", rng.random(3))
        w.append_eval(T, test_loss=0.5, test_acc=0.9)
        w.write_array("data/train_index", np.arange(20))
    return w


@pytest.mark.parametrize("per_param,trajectory,n_classes", [(True, True, N_CLASSES), (False, False, None)])
def test_every_dataset_the_writer_writes_is_described_with_its_dtype_and_row_shape(
    tmp_path: Path, per_param: bool, trajectory: bool, n_classes: int | None
) -> None:
    path = tmp_path / "lca.h5"
    w = _write(path, per_param, trajectory, n_classes)
    layout = Layout(K, len(LAYER_NAMES), n_classes, per_param, trajectory)
    assert w.layout == layout
    described = {s.name: s for s in SERIES}
    with h5py.File(path, "r") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
        free = {"extra/series", "data/train_index", "eval/iteration", *(f"eval/{n}" for n in EVAL_NAMES)}
        assert set(found) - free == {n for n, s in described.items() if layout.present(s)} | set(TABLES)
        for name, s in described.items():
            if not layout.present(s):
                assert name not in f
                continue
            ds = f[name]
            assert ds.dtype == s.dtype and ds.shape == (T + s.extra, *layout.row_shape(s)), name
            assert ds.maxshape[0] is None, name  # grows by rows
        for name, kind in TABLES.items():
            assert (kind == "str") == (h5py.check_string_dtype(f[name].dtype) is not None), name
        check_layout(f, path)  # the checks accept what the writer wrote
    with open_run(path) as r:
        assert r.n_rows == T
    assert write_order(layout.specs())[-1] == COMMIT  # lca/iteration commits every flush's rows


@pytest.mark.parametrize("name", [s.name for s in SERIES])
def test_check_layout_refuses_a_described_dataset_of_another_shape_or_dtype(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / "lca.h5"
    _write(path, True, True, N_CLASSES)
    s = next(s for s in SERIES if s.name == name)
    with h5py.File(path, "r+") as f:
        rows = f[name][()]
        del f[name]
        if s.row:  # one column too many along the last dimension (K or L wide)
            wider = np.concatenate([rows, rows[..., :1]], axis=-1)
            f.create_dataset(name, data=wider, maxshape=(None, *wider.shape[1:]))
        else:  # a scalar series as strings
            f.create_dataset(
                name, data=np.array([str(x) for x in rows], dtype=object), dtype=h5py.string_dtype()
            )
    with h5py.File(path, "r") as f, pytest.raises(MalformedRunFileError, match=name):
        check_layout(f, path)
