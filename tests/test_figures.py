"""Tests for lca_lab.figures: every figure renders; heatmap, bar and dot geometry and colours are right."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from lca_lab import figures as F


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _image(fig):
    images = fig.axes[0].images
    assert len(images) == 1
    return images[0]


def _png_ok(path):
    assert path.exists() and path.stat().st_size > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# every figure renders to a PNG


def _builders(rng):
    T, names = 40, ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]
    h = rng.uniform(0.45, 0.55, T)
    z = rng.uniform(0.0, 0.1, T)
    totals = [rng.normal(-0.05, 0.01, (3, len(names))) for _ in range(4)]
    return {
        "heatmap_conv": lambda: F.param_heatmap(rng.laplace(0, 1e-5, (4, 3, 5, 5)), title="conv2.weight"),
        "heatmap_linear": lambda: F.param_heatmap(rng.laplace(0, 1e-5, (10, 30)), title="fc3.weight"),
        "heatmap_bias": lambda: F.param_heatmap(rng.laplace(0, 1e-5, 12), title="fc3.bias"),
        "helping_over_training": lambda: F.helping_over_training(
            h, 1 - h - z, z, loss=np.linspace(2, 0.1, T + 1)
        ),
        "lca_distribution": lambda: F.lca_distribution(rng.laplace(0, 1e-6, (20, 300))),
        "helping_per_layer": lambda: F.helping_per_layer([52.0, 51.0, 50.5], ["fc1", "fc2", "fc3"]),
        "fraction_helped_histogram": lambda: F.fraction_helped_histogram(rng.uniform(0.3, 0.7, 500)),
        "layer_totals": lambda: F.layer_totals(totals[:2], names, ["regular", "last layer frozen"]),
        "layer_vs_value": lambda: F.layer_vs_value(np.arange(4), totals, names, fit=(0.01, -0.05)),
        "moments_of_learning": lambda: F.moments_of_learning(
            [[3, 10, 20], [3, 12], [3, 25, 30]], 40, ["fc1", "fc2", "fc3"], synchronized=[3]
        ),
        "top_trajectories": lambda: F.top_trajectories(
            rng.normal(size=(2, T + 1)),
            rng.normal(size=(2, T + 1)),
            rng.normal(size=(2, T)),
            ["fc3.weight[2,17] (helped most)", "fc1.weight[0,5] (hurt most)"],
        ),
        "loss_curves": lambda: F.loss_curves(
            np.arange(T), np.linspace(2.3, 0.1, T), [0, 20, 39], [2.3, 0.5, 0.3]
        ),
    }


@pytest.mark.parametrize("name", list(_builders(np.random.default_rng(0))))
def test_each_figure_saves_png(name, rng, tmp_path):
    fig = _builders(rng)[name]()
    assert isinstance(fig, Figure)
    out = F.save(fig, tmp_path / "sub" / f"{name}.png")
    _png_ok(out)
    assert not fig.axes  # save() closed (cleared) the figure


def test_figures_module_does_not_import_pyplot():
    code = "import sys, lca_lab.figures; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------
# heatmap layout and colours


def test_conv_heatmap_layout_blocks_with_separators(rng):
    w = rng.normal(size=(4, 3, 5, 5))
    im = _image(F.param_heatmap(w))
    grid = np.ma.filled(im.get_array(), np.nan)
    assert grid.shape == (4 * 5 + 3, 3 * 5 + 2)
    for o in range(4):
        for i in range(3):
            np.testing.assert_array_equal(grid[o * 6 : o * 6 + 5, i * 6 : i * 6 + 5], w[o, i])
    assert np.isnan(grid[5, :]).all() and np.isnan(grid[:, 5]).all()  # separator row / column
    assert np.isfinite(grid).sum() == w.size


def test_linear_and_bias_heatmap_shapes(rng):
    assert _image(F.param_heatmap(rng.normal(size=(7, 9)))).get_array().shape == (7, 9)
    assert _image(F.param_heatmap(rng.normal(size=6))).get_array().shape == (1, 6)
    # 1x1 convs need no separators
    assert _image(F.param_heatmap(rng.normal(size=(8, 4, 1, 1)))).get_array().shape == (8, 4)


def test_heatmap_symmetric_scale_default_99th_percentile(rng):
    x = rng.normal(size=(20, 30))
    im = _image(F.param_heatmap(x))
    vmax = np.percentile(np.abs(x), 99)
    assert im.norm.vmin == pytest.approx(-vmax) and im.norm.vmax == pytest.approx(vmax)
    im = _image(F.param_heatmap(x, vmax=2.5))
    assert (im.norm.vmin, im.norm.vmax) == (-2.5, 2.5)


def _rgba(im):
    return im.to_rgba(im.get_array())


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 8), (5,)])
def test_heatmap_negative_is_green_positive_is_red(shape, rng):
    mag = rng.uniform(0.2, 1.0, shape)
    neg = _rgba(_image(F.param_heatmap(-mag)))
    pos = _rgba(_image(F.param_heatmap(mag)))
    r, g, b = neg[0, 0, 0], neg[0, 0, 1], neg[0, 0, 2]
    assert g > r + 0.1 and g > b, neg[0, 0]
    r, g, b = pos[0, 0, 0], pos[0, 0, 1], pos[0, 0, 2]
    assert r > g + 0.1 and r > b + 0.1, pos[0, 0]
    zero = _rgba(_image(F.param_heatmap(np.zeros(shape))))
    np.testing.assert_allclose(zero[0, 0, :3], 1.0, atol=0.02)  # white


# ----------------------------------------------------------------------------------------------------
# animation


@pytest.mark.parametrize(("T", "max_frames", "expected"), [(12, 5, 5), (3, 200, 3)])
def test_param_animation_writes_gif_with_frames(T, max_frames, expected, rng, tmp_path):
    from PIL import Image

    lca = rng.laplace(0, 1e-5, (T, 3, 2, 3, 3))
    out = tmp_path / "anim" / "conv.gif"
    ret = F.param_animation(lca, out, iterations=np.arange(T) * 10, fps=5, max_frames=max_frames)
    assert ret == out
    with Image.open(out) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == expected


@pytest.mark.parametrize("shape", [(20, 30), (3, 2, 3, 3), (7,)])
def test_param_animation_frames_equal_full_redraws(shape, rng):
    """The blitted frames (background drawn once) equal full draws of the same figure state: identical
    everywhere but the antialiased edge pixels of the axes' spines, which a frame draws once more."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    a = rng.laplace(0, 1e-5, (3, *shape))
    vmax = F._symmetric_vmax(a, None)
    grid0 = F._layer_grid(a[0])[0]
    fig = F._new_figure(*F._heatmap_figsize(grid0))
    ax, im = F._draw_heatmap(fig, a[0], vmax, "t")
    fig.get_layout_engine().set(rect=(0, 0, 1, 1))
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    content = [(F._layer_grid(a[k])[0], F._heatmap_title(f"iteration {k}", a[k])) for k in range(3)]
    frames = F._blit_frames(fig, ax, im, 80, content)
    for (grid, title), frame in zip(content, frames):
        im.set_data(grid)
        ax.title.set_text(title)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        full = np.asarray(canvas.buffer_rgba()).astype(int)
        diff = np.abs(full - np.asarray(frame).astype(int)).max(-1)
        assert diff.shape == full.shape[:2] and diff.max() <= 32
        x0, y0, x1, y1 = ax.get_window_extent().extents
        rows, cols = np.nonzero(diff)
        y = full.shape[0] - rows  # display coordinates run upwards
        near_edge = (np.minimum(abs(cols - x0), abs(cols - x1)) <= 2) | (
            np.minimum(abs(y - y0), abs(y - y1)) <= 2
        )
        assert near_edge.all()


# ----------------------------------------------------------------------------------------------------
# bars with error bars


def test_layer_totals_bars_means_and_std_error_bars(rng):
    names = ["conv1", "layer1", "layer2", "fc"]
    groups = [rng.normal(0, 1, (5, 4)), rng.normal(1, 2, (3, 4)), rng.normal(-1, 1, (1, 4))]
    fig = F.layer_totals(groups, names, ["a", "b", "c"])
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == len(groups)
    for bc, g in zip(bars, groups):
        assert len(bc.patches) == len(names)
        np.testing.assert_allclose([p.get_height() for p in bc.patches], g.mean(axis=0))
        std = g.std(axis=0, ddof=1) if g.shape[0] > 1 else np.zeros(len(names))
        segs = bc.errorbar.lines[2][0].get_segments()
        np.testing.assert_allclose([(s[1][1] - s[0][1]) / 2 for s in segs], std)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["a (n = 5 seeds)", "b (n = 3 seeds)", "c (n = 1 seed)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == names


def test_layer_totals_rejects_wrong_layer_count(rng):
    with pytest.raises(ValueError, match="n_seeds"):
        F.layer_totals([rng.normal(size=(3, 5))], ["a", "b"])


def test_layer_vs_value_default_last_five_layers(rng):
    names = [f"l{i}" for i in range(8)]
    totals = [rng.normal(size=(4, 8)) for _ in range(3)]
    fig = F.layer_vs_value([2, 0, 1], totals, names, fit=(0.5, 1.0))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:5] == names[3:]
    assert "linear fit" in labels[5]
    fig = F.layer_vs_value([0, 1, 2], totals, names, layers=["l0", 7])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["l0", "l7"]


def test_helping_per_layer_bars_and_reference(rng):
    fig = F.helping_per_layer([55.0, 50.0, 45.0], ["fc1", "fc2", "fc3"])
    ax = fig.axes[0]
    (bc,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in bc.patches] == [55.0, 50.0, 45.0]
    assert any(np.allclose(line.get_ydata(), 50) for line in ax.get_lines())


# ----------------------------------------------------------------------------------------------------
# moments of learning


def _scatter(ax, label):
    (pc,) = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_label() == label]
    return pc


def test_moments_red_markers_exactly_at_synchronized(rng):
    moments = [[3, 10, 20, 33], [3, 12, 33], [3, 25, 30, 33]]
    sync = [3, 33]
    fig = F.moments_of_learning(moments, 40, ["fc1", "fc2", "fc3"], synchronized=sync)
    ax = fig.axes[0]
    red = _scatter(ax, "synchronized")
    xy = red.get_offsets()
    assert sorted(map(tuple, np.asarray(xy))) == sorted((x, row) for row in range(3) for x in sync)
    np.testing.assert_allclose(red.get_facecolors()[0], to_rgba(F.HURT_COLOR))
    grey = np.asarray(_scatter(ax, "moment of learning").get_offsets())
    assert not np.isin(grey[:, 0], sync).any()
    assert len(grey) == sum(len(m) for m in moments) - 6
    vlines = [ln for ln in ax.get_lines() if ln.get_color() == F.HURT_COLOR]
    assert sorted(ln.get_xdata()[0] for ln in vlines) == sync
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fc1", "fc2", "fc3"]  # layer 0 at the bottom
    assert ax.get_yticks()[0] == 0


def test_moments_per_class_one_panel_each(rng):
    per_class = [[[1, 5], [1, 7]], [[2, 9], [4, 9]], [[0], [6]]]
    syncs = [[1], [9], []]
    fig = F.moments_of_learning(
        per_class, 10, ["fc1", "fc2"], synchronized=syncs, class_names=["a", "b", "c"]
    )
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["a", "b", "c"]
    for ax, s in zip(axes, syncs):
        xs = np.asarray(_scatter(ax, "synchronized").get_offsets()).reshape(-1, 2)[:, 0]
        assert sorted(xs) == sorted(s * 2)


# ----------------------------------------------------------------------------------------------------
# inputs and annotations


def test_helping_over_training_rejects_percent():
    with pytest.raises(ValueError, match="fractions"):
        F.helping_over_training([55.0, 52.0], [40.0, 45.0], [5.0, 3.0])


def test_lca_distribution_states_clipped_fraction():
    v = np.concatenate([-np.arange(1, 501), np.arange(1, 501), np.zeros(100)]).astype(float)
    fig = F.lca_distribution(v, clip_quantile=0.9)
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "90th percentile" in text
    assert "10.00% of non-zero entries" in text  # |v| > 450: 50 of 500 on each side
    assert "100 of 1,100 entries" in text


def test_fraction_helped_histogram_counts_all_finite(rng):
    f = np.concatenate([rng.uniform(0, 1, 300), [np.nan] * 7])
    fig = F.fraction_helped_histogram(f, bins=10)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert sum(heights) == 300
    assert "7" in fig.axes[0].get_title()
