"""Figures for Loss Change Allocation (Lan et al., NeurIPS 2019, Figures 2-6).

Every function takes NumPy arrays (never file paths) and returns a :class:`matplotlib.figure.Figure`;
:func:`save` writes it as PNG (dpi 120) and closes it. :func:`param_animation` writes a GIF itself.
Figures are built with :class:`matplotlib.figure.Figure` directly, so nothing here touches pyplot's
global state or needs an interactive backend.

Conventions (as in the paper):

* LCA is in **nats** (the loss is a mean cross-entropy in nats). ``LCA[t, i]`` is parameter ``i``'s share
  of ``L(θ_{t+1}) − L(θ_t)``.
* **Negative** LCA = the parameter **helped** (lowered the loss): drawn **green**.
  **Positive** LCA = it **hurt** (raised the loss): drawn **red**. Zero is white.
* "Zeros ignored" means entries with LCA exactly 0 are left out of helping / hurting percentages.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

__all__ = [
    "LCA_CMAP",
    "HELP_COLOR",
    "HURT_COLOR",
    "ZERO_COLOR",
    "save",
    "param_heatmap",
    "param_animation",
    "helping_over_training",
    "lca_distribution",
    "helping_per_layer",
    "fraction_helped_histogram",
    "layer_totals",
    "layer_vs_value",
    "moments_of_learning",
    "top_trajectories",
    "loss_curves",
]

HELP_COLOR = "#238b45"  # green: negative LCA, the loss went down
HURT_COLOR = "#d7301f"  # red: positive LCA, the loss went up
ZERO_COLOR = "#bdbdbd"  # grey: exactly zero LCA (in bar / area charts; white in heatmaps)
SEPARATOR_COLOR = "#d9d9d9"  # grey lines between conv filter blocks in heatmaps

#: Diverging colormap for LCA: dark green (most negative, helped) - white (0) - dark red (hurt).
LCA_CMAP = LinearSegmentedColormap.from_list(
    "lca_green_white_red", ["#00441b", "#41ab5d", "#ffffff", "#ef3b2c", "#67000d"], N=257
).with_extremes(bad=SEPARATOR_COLOR)

SAVE_DPI = 120
_LCA_UNIT = "nats"


# ----------------------------------------------------------------------------------------------------
# helpers


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as PNG at dpi 120 (parent folders created) and close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=SAVE_DPI, format="png", bbox_inches="tight", pad_inches=0.1)
    finally:
        _close(fig)
    return path


def _close(fig: Figure) -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:  # only if the caller uses pyplot; we never import it ourselves
        plt.close(fig)
    fig.clear()


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _x_for(n: int, iterations) -> np.ndarray:
    """The x positions for a series of length ``n``: ``iterations`` if given, else 0..n-1."""
    if iterations is None:
        return np.arange(n)
    it = np.asarray(iterations)
    if it.shape != (n,):
        raise ValueError(f"iterations has shape {it.shape}, expected ({n},)")
    return it


def _rotate_if_long(ax, names: Sequence[str]) -> None:
    if names and (max(len(n) for n in names) > 6 or len(names) > 10):
        for lab in ax.get_xticklabels():
            lab.set_rotation(45)
            lab.set_horizontalalignment("right")
            lab.set_rotation_mode("anchor")


def _symmetric_vmax(a: np.ndarray, vmax: float | None, q: float = 99.0) -> float:
    if vmax is not None:
        vmax = float(abs(vmax))
        if vmax > 0 and np.isfinite(vmax):
            return vmax
        raise ValueError(f"vmax must be a positive finite number, got {vmax}")
    mag = np.abs(a[np.isfinite(a)])
    if mag.size == 0:
        return 1.0
    v = float(np.percentile(mag, q))
    if v <= 0:  # more than (100-q)% exact zeros: fall back to the largest magnitude
        v = float(mag.max())
    return v if v > 0 else 1.0


# ----------------------------------------------------------------------------------------------------
# 1-2. per-parameter heatmaps (Figure 2)


def _layer_grid(a: np.ndarray) -> tuple[np.ndarray, dict]:
    """Arrange one layer's per-parameter array as a 2-D image plus axis-labelling info.

    * 1-D ``[n]`` (bias) → ``[1, n]``.
    * 2-D ``[out, in]`` (linear) → itself.
    * 4-D ``[out, in, kh, kw]`` (conv) → blocks of ``kh×kw`` (rows = output channels, columns = input
      channels) separated by one NaN pixel (drawn grey) when the kernel is larger than 1×1: shape
      ``[out*kh + out-1, in*kw + in-1]``.
    * 3-D ``[out, in, k]`` (conv1d) is treated as ``[out, in, 1, k]``; anything else as ``[shape[0], -1]``.
    """
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim == 1:
        return a[None, :], {"kind": "vector", "n": a.shape[0]}
    if a.ndim == 2:
        return a, {"kind": "matrix", "out": a.shape[0], "in": a.shape[1]}
    if a.ndim == 3:
        a = a[:, :, None, :]
    if a.ndim == 4:
        n_out, n_in, kh, kw = a.shape
        sep = 1 if kh * kw > 1 else 0
        grid = np.full((n_out * kh + sep * (n_out - 1), n_in * kw + sep * (n_in - 1)), np.nan)
        for o in range(n_out):
            r = o * (kh + sep)
            for i in range(n_in):
                c = i * (kw + sep)
                grid[r : r + kh, c : c + kw] = a[o, i]
        return grid, {"kind": "conv", "out": n_out, "in": n_in, "kh": kh, "kw": kw, "sep": sep}
    flat = a.reshape(a.shape[0], -1)
    return flat, {"kind": "matrix", "out": flat.shape[0], "in": flat.shape[1]}


def _block_ticks(n: int, size: int, sep: int) -> tuple[np.ndarray, list[str]]:
    step = max(1, math.ceil(n / 10))
    idx = np.arange(0, n, step)
    return idx * (size + sep) + (size - 1) / 2, [str(i) for i in idx]


def _label_heatmap_axes(ax, info: dict) -> None:
    kind = info["kind"]
    if kind == "vector":
        ax.set_yticks([])
        ax.set_xlabel("parameter index (bias / 1-D parameter)")
    elif kind == "matrix":
        ax.set_xlabel("input unit (weight column)")
        ax.set_ylabel("output unit (weight row)")
    else:
        xt, xl = _block_ticks(info["in"], info["kw"], info["sep"])
        yt, yl = _block_ticks(info["out"], info["kh"], info["sep"])
        ax.set_xticks(xt, xl)
        ax.set_yticks(yt, yl)
        ax.set_xlabel(f"input channel (each block: one {info['kh']}×{info['kw']} kernel)")
        ax.set_ylabel("output channel")


def _heatmap_figsize(grid: np.ndarray, max_width: float = 9.0) -> tuple[float, float]:
    h, w = grid.shape
    if h == 1:  # a single row: a strip
        return max_width, 2.6
    img_w = min(max_width - 1.8, max(3.0, w / 12))
    img_h = float(np.clip(img_w * h / w, 2.0, 8.0))
    return img_w + 1.8, img_h + 1.9


def _heatmap_title(title: str, a: np.ndarray) -> str:
    """Two title lines: the caller's title with the parameter shape, then helped / hurt / zero and the sum."""
    finite = a[np.isfinite(a)]
    n = max(finite.size, 1)
    neg, pos = np.count_nonzero(finite < 0), np.count_nonzero(finite > 0)
    zero = finite.size - neg - pos
    count = f"{a.size:,} parameters"
    if a.ndim > 1:
        count = f"{'×'.join(map(str, a.shape))} = {count}"
    head = f"{title}  [{count}]" if title else f"[{count}]"
    return (
        f"{head}\nhelped {100 * neg / n:.1f}%, hurt {100 * pos / n:.1f}%, zero {100 * zero / n:.1f}%; "
        f"sum = {finite.sum():+.3g} {_LCA_UNIT}"
    )


def _nats_scale(vmax: float) -> tuple[FuncFormatter, str]:
    """Tick formatter and unit text for values up to ``vmax`` nats; tiny or huge ranges get the power of ten
    in the unit (``×10⁻⁵ nats``) instead of matplotlib's easily missed offset text."""
    e = int(math.floor(math.log10(vmax))) if vmax > 0 and np.isfinite(vmax) else 0
    if -2 <= e <= 2:
        return FuncFormatter(lambda v, _: f"{v:.4g}".replace("-", "\u2212")), _LCA_UNIT
    scale = 10.0**e
    fmt = FuncFormatter(lambda v, _: f"{v / scale:.3g}".replace("-", "\u2212"))
    return fmt, f"$\\times 10^{{{e}}}$ {_LCA_UNIT}"


def _scaled_colorbar_label(cb, vmax: float, note: str) -> None:
    fmt, unit = _nats_scale(vmax)
    cb.formatter = fmt
    cb.set_label(f"LCA ({unit})\n{note}", fontsize=9)
    cb.update_ticks()


def _draw_heatmap(fig: Figure, a: np.ndarray, vmax: float, title: str):
    grid, info = _layer_grid(a)
    ax = fig.add_subplot()
    im = ax.imshow(
        grid,
        cmap=LCA_CMAP,
        norm=Normalize(-vmax, vmax),
        interpolation="nearest",
        aspect="auto",
        origin="upper",
    )
    _label_heatmap_axes(ax, info)
    cb = fig.colorbar(
        im, ax=ax, extend="both", extendfrac=0.04, aspect=30, shrink=0.95 if grid.shape[0] > 1 else 1.0
    )
    _scaled_colorbar_label(cb, vmax, "← green: helped   red: hurt →")
    ax.set_title(_heatmap_title(title, a), fontsize=10)
    return ax, im


def param_heatmap(lca_layer_t, title: str = "", vmax: float | None = None) -> Figure:
    """Heatmap of one layer's per-parameter LCA at one iteration (the paper's Figure 2 frames).

    Args:
        lca_layer_t: LCA in nats of every parameter of one layer at one iteration, shaped like the
            parameter: ``[out, in]`` (linear weight), ``[out, in, kh, kw]`` (conv weight: drawn as a grid
            of ``kh×kw`` blocks, rows = output channels, columns = input channels, blocks separated by
            one grey pixel), or ``[n]`` (bias: a single row).
        title: first line of the title (e.g. ``"conv2.weight, iteration 20"``); a second line gives the
            percentages helped / hurt / zero and the layer's total LCA.
        vmax: colour-scale limit in nats; the scale runs symmetrically from ``-vmax`` (dark green) over
            0 (white) to ``+vmax`` (dark red); values beyond are drawn at the extreme colour. Default: the
            99th percentile of ``|LCA|``.

    Returns:
        The figure; ``fig.axes[0].images[0]`` is the :class:`~matplotlib.image.AxesImage` (grey NaN pixels
        separate conv blocks).
    """
    a = np.asarray(lca_layer_t, dtype=float)
    vmax = _symmetric_vmax(a, vmax)
    grid, _ = _layer_grid(a)
    fig = _new_figure(*_heatmap_figsize(grid))
    _draw_heatmap(fig, a, vmax, title)
    return fig


def param_animation(
    lca_layer,
    path: str | os.PathLike,
    iterations=None,
    fps: int = 10,
    max_frames: int = 200,
    title: str = "",
    vmax: float | None = None,
    dpi: int = 80,
):
    """Animated GIF of one layer's per-parameter LCA through training (the paper's Figure 2 videos).

    Args:
        lca_layer: ``[T, *shape]`` LCA in nats per parameter per iteration (``shape`` as for
            :func:`param_heatmap`).
        path: where the GIF is written (parent folders created).
        iterations: ``[T]`` the training iteration of each row (default ``0..T-1``); shown in the title.
        fps: frames per second.
        max_frames: at most this many frames, evenly subsampled over the ``T`` rows (first and last kept).
        title: prefix of each frame's title (e.g. the layer name).
        vmax: fixed colour-scale limit in nats for all frames; default: 99th percentile of ``|LCA|`` over
            all frames.
        dpi: resolution of the frames.

    Returns:
        ``path``, unchanged.
    """
    a = np.asarray(lca_layer, dtype=float)
    if a.ndim < 2:
        raise ValueError(f"lca_layer must be [T, *shape], got shape {a.shape}")
    T = a.shape[0]
    its = _x_for(T, iterations)
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    idx = np.unique(np.round(np.linspace(0, T - 1, min(T, max_frames))).astype(int))
    vmax = _symmetric_vmax(a, vmax)
    grid, _ = _layer_grid(a[0])
    fig = _new_figure(*_heatmap_figsize(grid))
    prefix = f"{title}, " if title else ""
    ax, im = _draw_heatmap(fig, a[idx[0]], vmax, f"{prefix}iteration {its[idx[0]]}")
    fig.get_layout_engine().set(rect=(0, 0, 1, 1))
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # freeze the layout so every frame has the same geometry
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        # A generator: one frame's grid at a time (all of them at once would be T× a layer in float64).
        content = ((_layer_grid(a[k])[0], _heatmap_title(f"{prefix}iteration {its[k]}", a[k])) for k in idx)
        frames = _blit_frames(fig, ax, im, dpi, content)
        # As matplotlib's PillowWriter saves its frames (Pillow quantises each to a palette).
        frames[0].save(str(path), save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    finally:
        _close(fig)
    return path


def _blit_frames(fig: Figure, ax, im, dpi: int, frames: Iterable[tuple[np.ndarray, str]]) -> list:
    """RGBA frames (PIL images) of ``fig`` with ``im``'s data and ``ax``'s title set to each (grid, title).

    The static parts (axes, ticks, colour bar) are rendered once; each frame restores that background and
    draws only the image, the axes' spines over it (as a full draw orders them) and the title. A full
    redraw per frame cost ~0.2 s on a 2-core CPU, most of it laying out the same tick labels again.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    title_at = ax.title.get_position()  # where a full draw puts it; a draw with it hidden moves it away
    im.set_visible(False)
    ax.title.set_visible(False)
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    im.set_visible(True)
    ax.title.set_visible(True)
    ax.title.set_position(title_at)
    out = []
    for grid, title in frames:
        canvas.restore_region(background)
        im.set_data(grid)
        ax.title.set_text(title)
        ax.draw_artist(im)
        for spine in ax.spines.values():
            ax.draw_artist(spine)
        ax.draw_artist(ax.title)
        out.append(
            Image.frombuffer(
                "RGBA", canvas.get_width_height(), bytes(canvas.buffer_rgba()), "raw", "RGBA", 0, 1
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------
# 3-6. helping / hurting statistics (Figure 3)


def _check_fraction(a: np.ndarray, name: str) -> None:
    finite = a[np.isfinite(a)]
    if finite.size and (finite.min() < -1e-9 or finite.max() > 1 + 1e-9):
        raise ValueError(
            f"{name} must be fractions in [0, 1] (not percent); got range "
            f"[{finite.min():.3g}, {finite.max():.3g}]"
        )


def helping_over_training(
    frac_helping,
    frac_hurting,
    frac_zero,
    loss=None,
    iterations=None,
    loss_iterations=None,
    title: str = "Share of parameters that helped / hurt / had zero LCA at each iteration",
) -> Figure:
    """Percentage of parameters helping / hurting / zero per iteration, with the loss (paper Figure 3(a)).

    Args:
        frac_helping, frac_hurting, frac_zero: ``[T]`` fractions in [0, 1] of a network's parameters with
            negative (helped), positive (hurt) and exactly zero LCA at each iteration; drawn as stacked
            areas in percent (green / red / grey from the bottom up), with a dashed 50 % line.
        loss: optional train loss in nats, drawn as a black line on a right-hand axis.
        iterations: ``[T]`` iteration numbers of the fractions (default ``0..T-1``).
        loss_iterations: x positions of ``loss``; default ``iterations`` when ``loss`` has length ``T``,
            else ``0..len(loss)-1`` (e.g. ``T+1`` losses ``L(θ_0) … L(θ_T)``).
        title: axes title.
    """
    h = _as_1d(frac_helping, "frac_helping")
    u = _as_1d(frac_hurting, "frac_hurting")
    z = _as_1d(frac_zero, "frac_zero")
    if not h.shape == u.shape == z.shape:
        raise ValueError(f"fractions differ in length: {h.shape}, {u.shape}, {z.shape}")
    for arr, name in ((h, "frac_helping"), (u, "frac_hurting"), (z, "frac_zero")):
        _check_fraction(arr, name)
    x = _x_for(h.size, iterations)
    fig = _new_figure(8.5, 4.6)
    ax = fig.add_subplot()
    ax.stackplot(
        x,
        100 * h,
        100 * u,
        100 * z,
        colors=[HELP_COLOR, HURT_COLOR, ZERO_COLOR],
        labels=[
            f"helped (LCA < 0), mean {100 * np.nanmean(h):.1f}%",
            f"hurt (LCA > 0), mean {100 * np.nanmean(u):.1f}%",
            f"zero LCA, mean {100 * np.nanmean(z):.1f}%",
        ],
        alpha=0.8,
        linewidth=0,
        step="mid" if h.size < 60 else None,
    )
    ax.axhline(50, color="white", ls="--", lw=1.2)
    ax.set_ylim(0, 100)
    ax.set_xlim(x[0], x[-1] if x.size > 1 else x[0] + 1)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("% of parameters (stacked)")
    ax.set_title(title, fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="white", ls="--", lw=1.2))
    labels.append("50 %")
    if loss is not None:
        lo = _as_1d(loss, "loss")
        if loss_iterations is not None:
            lx = np.asarray(loss_iterations)
        elif lo.size == h.size:
            lx = x
        else:
            lx = np.arange(lo.size)
        ax2 = ax.twinx()
        (ln,) = ax2.plot(lx, lo, color="black", lw=1.6)
        ax2.set_ylabel("train loss (nats)")
        ax2.set_ylim(bottom=0)
        handles.append(ln)
        labels.append("train loss (right axis)")
    leg = fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    for hdl in leg.legend_handles:  # the white 50 % line needs a visible legend swatch
        if isinstance(hdl, Line2D) and hdl.get_color() == "white":
            hdl.set_color("0.4")
    return fig


def lca_distribution(
    values,
    clip_quantile: float = 0.99,
    bins: int = 60,
    log_y: bool = False,
    title: str = "Distribution of per-parameter, per-iteration LCA (zeros ignored)",
) -> Figure:
    """Histograms of helping and hurting LCA magnitudes (paper Figure 3(b)).

    Args:
        values: LCA in nats of any shape (typically ``[T, n_params]``: every parameter at every iteration).
            Exact zeros and non-finite entries are ignored. Helping entries (LCA < 0) are shown by their
            magnitude ``|LCA|`` in green, hurting entries (LCA > 0) in red, on shared bins.
        clip_quantile: the x axis stops at this quantile of ``|LCA|`` over all non-zero entries (both signs
            together); the share of entries beyond it, not drawn, is stated in the figure.
        bins: number of histogram bins.
        log_y: logarithmic count axis (shows the heavy tails).
        title: axes title.
    """
    if not 0 < clip_quantile <= 1:
        raise ValueError("clip_quantile must be in (0, 1]")
    v = np.asarray(values, dtype=float).ravel()
    n_all = v.size
    v = v[np.isfinite(v) & (v != 0)]
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(f"|LCA| of one parameter at one iteration ({_LCA_UNIT})")
    ax.set_ylabel("count (parameter × iteration entries)")
    if v.size == 0:
        ax.text(0.5, 0.5, "no non-zero LCA values", ha="center", va="center", transform=ax.transAxes)
        return fig
    mag = np.abs(v)
    thr = float(np.quantile(mag, clip_quantile))
    if thr <= 0:
        thr = float(mag.max())
    edges = np.linspace(0, thr, bins + 1)
    helping, hurting = -v[v < 0], v[v > 0]
    clipped = np.count_nonzero(mag > thr) / v.size
    sides = ((helping, HELP_COLOR, "helped (LCA < 0)", "-"), (hurting, HURT_COLOR, "hurt (LCA > 0)", "--"))
    for data, color, name, ls in sides:
        shown = data[data <= thr]
        ax.hist(
            shown,
            bins=edges,
            color=color,
            histtype="step",
            lw=1.8,
            ls=ls,
            label=f"{name}: {data.size:,} entries ({100 * data.size / v.size:.1f}%), "
            f"mean |LCA| {data.mean() if data.size else 0:.3g} {_LCA_UNIT}",
        )
    if log_y:
        ax.set_yscale("log")
    ax.set_xlim(0, thr)
    fmt, unit = _nats_scale(thr)
    ax.xaxis.set_major_formatter(fmt)
    ax.set_xlabel(f"|LCA| of one parameter at one iteration ({unit})")
    ax.legend(loc="upper right", fontsize=9, frameon=False)
    n_zero = n_all - v.size
    ax.text(
        0.98,
        0.72,
        f"x axis clipped at the {100 * clip_quantile:g}th percentile of |LCA| = {thr:.2g} {_LCA_UNIT};\n"
        f"{100 * clipped:.2f}% of non-zero entries lie beyond and are not drawn.\n"
        f"{n_zero:,} of {n_all:,} entries ({100 * n_zero / max(n_all, 1):.1f}%) are zero or non-finite "
        "and ignored.",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8,
        color="0.25",
    )
    return fig


def helping_per_layer(
    pct_by_layer,
    layer_names: Sequence[str],
    title: str = "Share of parameters helping, per layer\n(zeros ignored; averaged over iterations)",
) -> Figure:
    """Bar per layer of the percentage of parameters that helped (paper Figure 3(c)).

    Args:
        pct_by_layer: ``[n_layers]`` percent (0-100) of a layer's non-zero LCA entries that were negative
            (helped), e.g. averaged over iterations.
        layer_names: ``n_layers`` names, in network order (left to right).
        title: axes title.
    """
    p = _as_1d(pct_by_layer, "pct_by_layer")
    names = [str(n) for n in layer_names]
    if len(names) != p.size:
        raise ValueError(f"{p.size} values but {len(names)} layer names")
    finite = p[np.isfinite(p)]
    if finite.size and (finite.min() < 0 or finite.max() > 100):
        raise ValueError("pct_by_layer must be percentages in [0, 100]")
    if finite.size and finite.max() <= 1:
        warnings.warn("pct_by_layer are all <= 1: are these fractions rather than percent?", stacklevel=2)
    fig = _new_figure(max(5.0, min(16.0, 1.5 + 0.55 * p.size)), 4.4)
    ax = fig.add_subplot()
    x = np.arange(p.size)
    bars = ax.bar(x, p, color=HELP_COLOR, alpha=0.85, width=0.7, label="% of parameters helping")
    ax.bar_label(
        bars,
        labels=[f"{v:.1f}" for v in p],
        label_type="center",
        color="white",
        fontsize=8 if p.size <= 12 else 7,
        rotation=0 if p.size <= 12 else 90,
    )
    ax.axhline(50, color="black", ls="--", lw=1, label="50 % (as many helping as hurting)")
    ax.set_xticks(x, names)
    _rotate_if_long(ax, names)
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, p.size - 0.4)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("% of non-zero LCA entries\nthat helped (LCA < 0)")
    ax.set_title(title, fontsize=10)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncol=2)
    return fig


def fraction_helped_histogram(
    frac_helped_per_param,
    bins: int = 50,
    title: str = "How often does each parameter help?",
) -> Figure:
    """Histogram over parameters of the fraction of iterations each one helped (paper Figure 3(d)).

    Args:
        frac_helped_per_param: ``[n_params]`` (any shape; flattened) fraction in [0, 1] of the iterations
            in which a parameter had negative LCA (commonly among iterations with non-zero LCA).
            Non-finite entries (e.g. parameters whose LCA was always zero) are dropped and counted.
        bins: number of bins over [0, 1].
        title: axes title.
    """
    f = np.asarray(frac_helped_per_param, dtype=float).ravel()
    n_all = f.size
    f = f[np.isfinite(f)]
    _check_fraction(f, "frac_helped_per_param")
    fig = _new_figure(7.0, 4.4)
    ax = fig.add_subplot()
    ax.hist(f, bins=np.linspace(0, 1, bins + 1), color=HELP_COLOR, alpha=0.8, edgecolor="white", lw=0.3)
    if f.size:
        ax.axvline(float(f.mean()), color="black", lw=2, zorder=3, label=f"mean = {f.mean():.3f}")
    ax.axvline(0.5, color="#fdae61", ls="--", lw=1.4, zorder=4, label="0.5 (helps half of the time)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of iterations in which the parameter helped (LCA < 0)")
    ax.set_ylabel("number of parameters")
    dropped = n_all - f.size
    sub = f"{f.size:,} parameters" + (f"; {dropped:,} without a finite value left out" if dropped else "")
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------------------------------
# 7-8. per-layer totals across configurations and seeds (Figures 4 and 5)


def _mean_std(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed) over axis 0."""
    mean = g.mean(axis=0)
    std = g.std(axis=0, ddof=1) if g.shape[0] > 1 else np.zeros_like(mean)
    return mean, std


def layer_totals(
    groups,
    layer_names: Sequence[str],
    labels: Sequence[str] | None = None,
    title: str = "Total LCA per layer, summed over training",
) -> Figure:
    """Grouped bars of each layer's total LCA for several configurations (paper Figure 4, left).

    Args:
        groups: one array per configuration, ``[n_seeds, n_layers]``: each layer's LCA summed over all
            iterations (nats) for each seed. Bars show the mean over seeds, error bars the sample standard
            deviation (``ddof=1``; none for a single seed). Negative = the layer helped lower the loss.
        layer_names: ``n_layers`` names in network order.
        labels: one label per configuration (default ``"config 0"``, …); the legend adds ``n`` = seeds.
        title: axes title.

    Returns:
        The figure; ``fig.axes[0].containers`` holds one :class:`~matplotlib.container.BarContainer` per
        configuration (its ``.errorbar`` carries the error bars).
    """
    gs = [np.atleast_2d(np.asarray(g, dtype=float)) for g in groups]
    names = [str(n) for n in layer_names]
    if not gs:
        raise ValueError("groups is empty")
    for k, g in enumerate(gs):
        if g.ndim != 2 or g.shape[1] != len(names):
            raise ValueError(f"groups[{k}] has shape {g.shape}; expected [n_seeds, {len(names)}]")
    labels = [f"config {k}" for k in range(len(gs))] if labels is None else [str(s) for s in labels]
    if len(labels) != len(gs):
        raise ValueError(f"{len(gs)} groups but {len(labels)} labels")
    n_layers, n_groups = len(names), len(gs)
    fig = _new_figure(max(6.0, min(14.0, 2.0 + n_layers * (0.3 + 0.15 * n_groups))), 5.0)
    ax = fig.add_subplot()
    x = np.arange(n_layers)
    width = 0.8 / n_groups
    for k, (g, lab) in enumerate(zip(gs, labels)):
        mean, std = _mean_std(g)
        ax.bar(
            x + (k - (n_groups - 1) / 2) * width,
            mean,
            width,
            yerr=std,
            capsize=max(1.0, 6 * width),
            color=f"C{k}",
            error_kw={"elinewidth": 1, "ecolor": "black"},
            label=f"{lab} (n = {g.shape[0]} seed{'s' if g.shape[0] != 1 else ''})",
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, names)
    _rotate_if_long(ax, names)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel(f"total LCA ({_LCA_UNIT})\n< 0: helped,  > 0: hurt")
    ax.set_title(f"{title}\nbars: mean over seeds; error bars: ± 1 std across seeds", fontsize=10)
    fig.legend(loc="outside lower center", ncol=min(n_groups, 4), fontsize=9, frameon=False)
    return fig


def layer_vs_value(
    values,
    totals,
    layer_names: Sequence[str],
    value_name: str = "momentum delay",
    layers: Sequence[int | str] | None = None,
    fit: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """Per-layer total LCA versus a swept setting (paper Figure 5).

    Args:
        values: ``[n_configs]`` the swept setting (x axis), e.g. the last layer's momentum delay.
        totals: list of ``n_configs`` arrays ``[n_seeds, n_layers]`` (aligned with ``values``): each
            layer's LCA summed over training (nats). Points show the mean over seeds with ± 1 sample
            standard deviation (``ddof=1``) error bars.
        layer_names: ``n_layers`` names.
        value_name: x axis label.
        layers: layers to draw (indices or names); default the last 5. One line each.
        fit: optional ``(slope, intercept)`` of a straight line fitted to the *last* layer's total LCA
            versus ``values``; drawn dashed.
        title: axes title (a default is composed).
    """
    x = _as_1d(values, "values")
    ts = [np.atleast_2d(np.asarray(t, dtype=float)) for t in totals]
    names = [str(n) for n in layer_names]
    if len(ts) != x.size:
        raise ValueError(f"{x.size} values but {len(ts)} totals")
    for k, t in enumerate(ts):
        if t.ndim != 2 or t.shape[1] != len(names):
            raise ValueError(f"totals[{k}] has shape {t.shape}; expected [n_seeds, {len(names)}]")
    if layers is None:
        sel = list(range(max(0, len(names) - 5), len(names)))
    else:
        sel = [names.index(s) if isinstance(s, str) else int(s) % len(names) for s in layers]
    order = np.argsort(x, kind="stable")
    stats = [_mean_std(ts[k]) for k in order]
    means = np.array([m for m, _ in stats])
    stds = np.array([s for _, s in stats])
    xs = x[order]
    seeds = sorted({t.shape[0] for t in ts})
    fig = _new_figure(8.0, 4.8)
    ax = fig.add_subplot()
    handles = []
    for j, li in enumerate(sel):
        handles.append(
            ax.errorbar(
                xs,
                means[:, li],
                yerr=stds[:, li],
                marker="o",
                ms=4,
                lw=1.5,
                capsize=3,
                color=f"C{j % 10}",
                label=names[li],
            )
        )
    if fit is not None:
        slope, intercept = fit
        last = len(names) - 1
        color = f"C{sel.index(last) % 10}" if last in sel else "black"
        grid = np.linspace(xs.min(), xs.max(), 50)
        handles += ax.plot(
            grid,
            slope * grid + intercept,
            ls="--",
            color=color,
            lw=1.2,
            label=f"{names[last]}, linear fit\n(slope {slope:+.3g} {_LCA_UNIT} per unit)",
        )
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel(value_name)
    ax.set_ylabel(f"total LCA over training ({_LCA_UNIT})\n< 0: helped,  > 0: hurt")
    n_txt = f"n = {seeds[0]}" if len(seeds) == 1 else f"n = {seeds[0]}–{seeds[-1]}"
    ax.set_title(
        title or f"Total LCA per layer versus {value_name}\nmean ± 1 std across seeds ({n_txt} per point)",
        fontsize=10,
    )
    if xs.size <= 12 and np.allclose(xs, np.round(xs)):
        ax.set_xticks(xs)
    fig.legend(
        handles=handles, loc="outside right upper", fontsize=8, frameon=False, title="layer", title_fontsize=8
    )
    return fig


# ----------------------------------------------------------------------------------------------------
# 9. moments of learning (Figure 6)


def _is_per_class(moments) -> bool:
    for m in moments:
        for item in m:
            return np.ndim(item) > 0
    return False


def _draw_moments(ax, per_layer, n_layers: int, synchronized) -> None:
    sync = np.unique(np.asarray(list(synchronized) if synchronized is not None else [], dtype=float))
    for it in sync:
        ax.axvline(it, color=HURT_COLOR, lw=0.8, alpha=0.35, zorder=0)
    grey_x, grey_y, red_x, red_y = [], [], [], []
    for row, m in enumerate(per_layer):
        m = np.asarray(m, dtype=float).ravel()
        hit = np.isin(m, sync)
        grey_x += m[~hit].tolist()
        grey_y += [row] * int((~hit).sum())
        red_x += m[hit].tolist()
        red_y += [row] * int(hit.sum())
    ax.scatter(grey_x, grey_y, s=14, color="0.2", zorder=2, label="moment of learning")
    ax.scatter(red_x, red_y, s=22, color=HURT_COLOR, zorder=3, label="synchronized")
    ax.set_ylim(-0.6, n_layers - 0.4)


def moments_of_learning(
    moments,
    n_iterations: int,
    layer_names: Sequence[str],
    synchronized=None,
    class_names: Sequence[str] | None = None,
    title: str = "Moments of learning: iterations of peak per-layer learning (local minima of LCA)",
) -> Figure:
    """Dot plot of each layer's moments of learning over training (paper Figure 6 and S17).

    Args:
        moments: either a list with one entry per layer (in network order) of iteration indices — the
            moments of learning, e.g. the top-20 local minima of that layer's total LCA per iteration — or
            a list per class of such per-layer lists (per-class LCA; one small panel per class).
        n_iterations: the number of training iterations (x axis 0 … n_iterations).
        layer_names: one name per layer; layer 0 is drawn at the bottom, the last layer at the top.
        synchronized: iterations at which learning was synchronized across layers (e.g. a moment in every
            layer): dots at these iterations are red and a faint red vertical line marks each. For per-class
            input a list per class of such lists (a flat list applies to every class).
        class_names: titles of the per-class panels (default ``"class 0"``, …).
        title: figure title.

    Returns:
        The figure. In each axes the scatter labelled ``"synchronized"`` holds the red dots.
    """
    names = [str(n) for n in layer_names]
    per_class = class_names is not None or _is_per_class(moments)
    n_layers = len(names)
    sync_note = "red dots and vertical lines: iterations where learning was synchronized across layers"
    pad = 0.01 * n_iterations
    if not per_class:
        if len(moments) != n_layers:
            raise ValueError(f"{len(moments)} moment lists but {n_layers} layer names")
        fig = _new_figure(9.0, 1.4 + 0.45 * n_layers)
        ax = fig.add_subplot()
        _draw_moments(ax, moments, n_layers, synchronized)
        ax.set_yticks(range(n_layers), names)
        ax.set_xlim(-pad, n_iterations + pad)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("layer (input at bottom)")
        ax.set_title(f"{title}\n{sync_note}" if synchronized is not None else title, fontsize=10)
        ax.grid(axis="y", color="0.9", lw=0.8, zorder=0)
        return fig

    n_classes = len(moments)
    cls = (
        [f"class {c}" for c in range(n_classes)]
        if class_names is None
        else [f"class {c}" if str(c).isdigit() else str(c) for c in class_names]
    )
    if len(cls) != n_classes:
        raise ValueError(f"{n_classes} classes but {len(cls)} class names")
    if synchronized is None:
        syncs = [None] * n_classes
    elif _is_per_class([synchronized]) or (
        len(synchronized) == n_classes and all(np.ndim(s) > 0 for s in synchronized)
    ):
        syncs = list(synchronized)
    else:
        syncs = [synchronized] * n_classes
    if len(syncs) != n_classes:
        raise ValueError(f"{n_classes} classes but {len(syncs)} synchronized lists")
    ncols = min(5, n_classes)
    nrows = math.ceil(n_classes / ncols)
    fig = _new_figure(2.0 + 2.6 * ncols, 1.2 + nrows * (0.6 + 0.28 * n_layers))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    for c in range(nrows * ncols):
        ax = axes.flat[c]
        if c >= n_classes:
            ax.set_visible(False)
            continue
        if len(moments[c]) != n_layers:
            raise ValueError(f"class {c}: {len(moments[c])} moment lists but {n_layers} layer names")
        _draw_moments(ax, moments[c], n_layers, syncs[c])
        ax.set_title(cls[c], fontsize=9)
        ax.set_xlim(-pad, n_iterations + pad)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.grid(axis="y", color="0.9", lw=0.8, zorder=0)
        ax.tick_params(labelsize=8)
    axes[0, 0].set_yticks(range(n_layers), names)
    for ax in axes[:, 0]:
        ax.set_ylabel("layer", fontsize=9)
    fig.supxlabel("training iteration", fontsize=10)
    fig.suptitle(
        f"{title}, per class\n{sync_note}" if synchronized is not None else f"{title}, per class", fontsize=10
    )
    return fig


# ----------------------------------------------------------------------------------------------------
# 10-11. trajectories and loss curves


def top_trajectories(
    weights,
    grads,
    lca,
    labels: Sequence[str],
    iterations=None,
    title: str = "Trajectories of the parameters that helped and hurt most",
) -> Figure:
    """Weight, full-batch gradient and LCA through training for a few parameters (three stacked panels).

    Args:
        weights: ``[n_params, T_w]`` parameter values θ_t (dimensionless units of the parameter).
        grads: ``[n_params, T_g]`` full-training-set gradient ∂L/∂θ at θ_t (nats per unit of θ).
        lca: ``[n_params, T]`` LCA per iteration (nats).
        labels: one label per parameter, e.g. ``"fc3.weight[2,17] (helped most)"``.
        iterations: iteration number of column ``t``; default ``0..``. Each panel uses the first
            ``T_*`` entries, so weights may carry one column more (θ_0 … θ_T) than LCA.
        title: figure title.
    """
    series = [np.atleast_2d(np.asarray(a, dtype=float)) for a in (weights, grads, lca)]
    labels = [str(s) for s in labels]
    for a, name in zip(series, ("weights", "grads", "lca")):
        if a.ndim != 2 or a.shape[0] != len(labels):
            raise ValueError(f"{name} has shape {a.shape}; expected [{len(labels)}, T]")
    its = None if iterations is None else np.asarray(iterations)
    fig = _new_figure(9.0, 7.5)
    axes = fig.subplots(3, 1, sharex=True)
    ylabels = (
        "weight value θ",
        "full-batch gradient\n∂L/∂θ (nats per unit θ)",
        f"LCA per iteration ({_LCA_UNIT})\n< 0: helped",
    )
    for ax, a, ylab in zip(axes, series, ylabels):
        T = a.shape[1]
        if its is not None and its.size < T:
            raise ValueError(f"iterations has {its.size} entries, fewer than a series' length {T}")
        x = np.arange(T) if its is None else its[:T]
        for k in range(a.shape[0]):
            ax.plot(
                x,
                a[k],
                color=f"C{k % 10}",
                lw=1.2,
                label=f"{labels[k]}: total LCA {np.nansum(series[2][k]):+.3g} {_LCA_UNIT}",
            )
        ax.set_ylabel(ylab, fontsize=9)
        ax.grid(color="0.92", lw=0.6)
    for ax in axes[1:]:
        ax.axhline(0, color="black", lw=0.7)
    axes[-1].set_xlabel("training iteration")
    fig.suptitle(title, fontsize=11)
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside lower center",
        ncol=2 if len(labels) <= 4 else 3,
        fontsize=8,
        frameon=False,
    )
    return fig


def loss_curves(
    iterations,
    train_loss,
    test_iterations=None,
    test_loss=None,
    log_y: bool = False,
    title: str = "Loss during training",
) -> Figure:
    """Train (and optional test) loss versus iteration.

    Args:
        iterations: ``[n]`` iteration numbers of ``train_loss``.
        train_loss: ``[n]`` mean cross-entropy on the training set in nats.
        test_iterations: ``[m]`` iteration numbers of ``test_loss``.
        test_loss: ``[m]`` mean cross-entropy on the test set in nats.
        log_y: logarithmic loss axis.
        title: axes title.
    """
    tr = _as_1d(train_loss, "train_loss")
    x = _x_for(tr.size, iterations)
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.plot(x, tr, color="C0", lw=1.5, label=f"train (final {tr[-1]:.4g})" if tr.size else "train")
    if test_loss is not None:
        te = _as_1d(test_loss, "test_loss")
        tx = _x_for(te.size, test_iterations)
        ax.plot(
            tx,
            te,
            color="C1",
            lw=1.5,
            marker="o" if te.size <= 30 else None,
            ms=4,
            label=f"test (final {te[-1]:.4g})" if te.size else "test",
        )
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("loss (mean cross-entropy, nats)")
    ax.set_title(title, fontsize=11)
    ax.grid(color="0.92", lw=0.6)
    ax.legend(fontsize=9)
    return fig
