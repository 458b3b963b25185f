"""CUDA checks (skipped without a GPU): the device path agrees with the float64 CPU reference."""

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lca_lab.lca import FullBatchLoss, LCAEngine
from lca_lab.nets import build_net
from lca_lab.train import run

pytestmark = pytest.mark.gpu
CONF = Path(__file__).resolve().parents[1] / "conf"


def test_cuda_engine_matches_cpu_float64_reference():
    torch.manual_seed(0)
    model = build_net("resnet20", (3, 32, 32), 10, width=8)
    x, y = torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))
    ref = FullBatchLoss(copy.deepcopy(model).double(), x.double(), y, chunk_size=128)
    gpu = FullBatchLoss(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), chunk_size=128)
    t0 = ref.flat_params()
    t1 = t0 + 1e-3 * torch.randn_like(t0)
    a = LCAEngine(gpu, tolerance=1e-5).step(t0.float().cuda(), t1.float().cuda())
    b = LCAEngine(ref, tolerance=1e-8).step(t0, t1)
    assert abs(float(a.total) - float(b.total)) < 1e-4
    np.testing.assert_allclose(a.param.cpu().numpy(), b.param.numpy(), rtol=2e-2, atol=1e-6)


def test_resnet20_run_on_cuda_conserves(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "device=cuda",
                "net=resnet20",
                "data=synthetic",
                "data.shape=cifar10",
                "data.size=2000",
                "batch_size=128",
                "epochs=1",
                "opt.lr=0.05",
            ],
        )
    s = run(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    with h5py.File(tmp_path / "lca.h5") as f:
        err, conv = f["lca/error"][:], f["lca/converged"][:]
        assert "cuda" in f.attrs["device"]
    assert np.all((np.abs(err) <= 1e-3) | ~conv)
    assert s["cumulative_rel_error"] < 0.01
