"""``python -m lca_lab.bench --loops``: the cost of LCA inside other people's loops, against lca_lab's own.

One problem (MNIST-FC on synthetic MNIST-shaped data, plain SGD), trained for the same number of optimizer
steps by four loops, each with LCA and without it, in the same run:

* ``own``: ``python -m lca_lab``'s loop (:func:`lca_lab.train.run`; LCA off: ``lca.enabled=false``);
* ``track``: a hand-written loop with :func:`lca_lab.track`;
* ``lightning``: ``lightning.Trainer.fit`` with :class:`~lca_lab.integrations.lightning.LCACallback`;
* ``hf``: ``transformers.Trainer.train`` with :class:`~lca_lab.integrations.hf.LCATrainerCallback`.

Measured per loop: the median wall time of an optimizer step (the interval between consecutive steps,
after ``warmup`` steps), with and without LCA, in interleaved rounds (the median over rounds). ``lca_s`` =
with − without is what LCA costs inside that loop; ``overhead_vs_own`` = ``lca_s / lca_s(own)`` compares it
with lca_lab's loop at the same LCA work (``passes_per_row``: the gradient passes of a row, the same
engine and tolerance in every loop). A loop or framework that is not installed is skipped.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

LOOPS = ("own", "track", "lightning", "hf")


def config(n: int, batch: int, epochs: int, lca: bool, seed: int = 0) -> dict[str, Any]:
    """The run's configuration as ``python -m lca_lab`` composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [
        "device=cpu", "net=fc", "data=synthetic", "data.shape=mnist", f"data.size={n}", f"batch_size={batch}",
        f"epochs={epochs}", "opt=sgd", "opt.lr=0.05", "opt.momentum=0", f"seed={seed}", "logger=none",
        "figures=false", "checkpoint.enabled=false", f"eval_every={10**9}", f"lca.enabled={str(lca).lower()}",
        "store.per_param=true",
    ]  # fmt: skip
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


def _parts(cfg: dict[str, Any]):
    from .parts import build_parts

    p = build_parts(cfg, torch.device("cpu"))
    return p.model, p.data.train_x, p.data.train_y


class _Clock:
    """Wall time between consecutive optimizer steps."""

    def __init__(self):
        self.t: list[float] = []

    def tick(self) -> None:
        self.t.append(time.perf_counter())

    def intervals(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.t, self.t[1:])][warmup:]


def _own(cfg: dict[str, Any], run_dir: Path, warmup: int) -> list[float]:
    from unittest import mock

    from . import train

    clock = _Clock()

    class Bar(train.tqdm):  # lca_lab's loop updates its progress bar once per iteration, after the step
        def update(self, n=1):
            clock.tick()
            return super().update(n)

    with mock.patch.object(train, "tqdm", Bar):
        train.run(cfg, run_dir)
    return clock.intervals(warmup)


def _track(cfg: dict[str, Any], run_dir: Path, warmup: int) -> list[float]:
    from . import track

    model, x, y = _parts(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["opt"]["lr"])
    clock, bs, lca_on = _Clock(), int(cfg["batch_size"]), cfg["lca"]["enabled"]
    g = torch.Generator().manual_seed(0)
    ctx = track(model, (x, y), run_dir) if lca_on else None
    lca = ctx.__enter__() if ctx is not None else None
    try:
        for _ in range(int(cfg["epochs"])):
            for idx in torch.randperm(len(y), generator=g).split(bs):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if lca is not None:
                    lca.step(loss)
                clock.tick()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return clock.intervals(warmup)


def lightning_classifier(net: torch.nn.Module, lr: float, fail_at: int | None = None) -> Any:
    """``net`` as a LightningModule: ``forward`` gives its logits, ``training_step`` the batch's
    cross-entropy, plain SGD; ``fail_at``: raise at that optimizer step (for tests of a crashed fit)."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            if fail_at is not None and self.global_step == fail_at:
                raise RuntimeError(f"stopped by the test at step {fail_at}")
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Classifier()


def _lightning(cfg: dict[str, Any], run_dir: Path, warmup: int) -> list[float]:
    import lightning as L

    from .integrations.lightning import LCACallback

    model, x, y = _parts(cfg)
    clock = _Clock()

    class Tick(L.Callback):
        def on_train_batch_end(self, *args):
            clock.tick()

    cbs = [LCACallback(run_dir=run_dir, figures=False)] if cfg["lca"]["enabled"] else []
    trainer = L.Trainer(
        max_epochs=int(cfg["epochs"]), callbacks=[*cbs, Tick()], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = DataLoader(TensorDataset(x, y), batch_size=int(cfg["batch_size"]), shuffle=True)
    trainer.fit(lightning_classifier(model, cfg["opt"]["lr"]), data)
    return clock.intervals(warmup)


class WithLoss(torch.nn.Module):
    """A classifier as the HF Trainer takes it: ``forward(x, labels=None)`` → ``{"logits", "loss"}``."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, **({"loss": F.cross_entropy(logits, labels)} if labels is not None else {})}


class DictRows(Dataset):
    """(x, y) tensors as the HF Trainer's dict items ``{"x", "labels"}``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf(cfg: dict[str, Any], run_dir: Path, warmup: int) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .integrations.hf import LCATrainerCallback

    model, x, y = _parts(cfg)
    clock = _Clock()

    class Tick(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            clock.tick()

    args = TrainingArguments(
        str(run_dir / "hf_out"), per_device_train_batch_size=int(cfg["batch_size"]),
        num_train_epochs=int(cfg["epochs"]), learning_rate=cfg["opt"]["lr"], optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    cbs = [LCATrainerCallback(run_dir=run_dir, figures=False)] if cfg["lca"]["enabled"] else []
    Trainer(model=WithLoss(model), args=args, train_dataset=DictRows(x, y), callbacks=[*cbs, Tick()]).train()
    return clock.intervals(warmup)


RUNNERS = {"own": _own, "track": _track, "lightning": _lightning, "hf": _hf}
NEEDS = {"lightning": ("lightning",), "hf": ("transformers", "accelerate")}


def versions() -> dict[str, str]:
    """The versions of the loops' frameworks (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for m in ("lightning", "transformers", "accelerate"):
        try:
            out[m] = version(m)
        except PackageNotFoundError:
            pass
    return out


def available(loop: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in NEEDS.get(loop, ()))


def _passes_per_row(run_file: Path) -> float:
    with h5py.File(run_file, "r") as f:
        return float(f["lca/splits"][()].mean())


def measure(
    loops=LOOPS, n: int = 4096, batch: int = 128, epochs: int = 2, warmup: int = 3, repeats: int = 3
) -> list[dict]:
    """Each loop with and without LCA on the same problem, in ``repeats`` interleaved rounds (every loop
    once per round, so a slow spell of the machine falls on all of them); per loop the median over the
    rounds of each round's median step. See the module docstring."""
    torch.set_num_threads(1)  # the loops' own threading differs; one thread compares the work itself
    todo = [loop for loop in loops if available(loop)]
    times: dict[tuple[str, bool], list[float]] = {(loop, lca): [] for loop in todo for lca in (False, True)}
    splits: dict[str, float] = {}
    for _ in range(repeats):
        for loop in todo:
            for lca in (False, True):
                with tempfile.TemporaryDirectory() as d:
                    steps = RUNNERS[loop](config(n, batch, epochs, lca), Path(d), warmup)
                    times[loop, lca].append(statistics.median(steps))
                    if lca:
                        splits[loop] = _passes_per_row(Path(d) / "lca.h5")
    out = []
    for loop in loops:
        if loop not in todo:
            out.append({"loop": loop, "skipped": f"needs {', '.join(NEEDS[loop])}"})
            continue
        row: dict[str, Any] = {
            "loop": loop,
            "without_lca_s": statistics.median(times[loop, False]),
            "with_lca_s": statistics.median(times[loop, True]),
            "rounds_with_lca_s": times[loop, True],
            "mean_splits": splits[loop],
        }
        row["lca_s"] = row["with_lca_s"] - row["without_lca_s"]
        out.append(row)
    own = next((r for r in out if r["loop"] == "own" and "lca_s" in r), None)
    for r in out:
        if own is not None and "lca_s" in r:
            r["overhead_vs_own"] = r["lca_s"] / own["lca_s"]
    return out


def format_loops(rows: list[dict]) -> str:
    lines = [
        f"{'loop':<10} {'step, no LCA':>13} {'step, LCA':>11} {'LCA cost':>10} {'vs own':>7} {'splits':>7}"
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['loop']:<10} skipped ({r['skipped']})")
            continue
        lines.append(
            f"{r['loop']:<10} {1e3 * r['without_lca_s']:>10.2f} ms {1e3 * r['with_lca_s']:>8.2f} ms "
            f"{1e3 * r['lca_s']:>7.2f} ms {r.get('overhead_vs_own', float('nan')):>7.3f} "
            f"{r['mean_splits']:>7.2f}"
        )
    return "\n".join(lines)
