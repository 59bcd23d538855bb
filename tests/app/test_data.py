"""The data sets: numpy readers in torchvision's layout, splits, and the missing-root message."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from app_helpers import compose_config

from qat_lightning.app.data import (
    CIFAR_FILES,
    FASHION_FILES,
    check_data,
    read_cifar10,
    read_fashion_mnist,
    read_idx,
)
from qat_lightning.app.datamodule import ImageDataModule

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_read_back(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(path, images, gz)
    np.testing.assert_array_equal(read_idx(path), images)


def test_fashion_mnist_layout_reads(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in zip(FASHION_FILES, (6, 6, 4, 4), strict=True):
        shape = (n, 28, 28) if "images" in name else (n,)
        gz = name.startswith("t10k")
        write_idx(raw / (f"{name}.gz" if gz else name), rng.integers(0, 10, shape), gz)
    train_x, train_y, test_x, test_y = read_fashion_mnist(tmp_path)
    assert train_x.shape == (6, 1, 28, 28) and test_x.shape == (4, 1, 28, 28)
    assert train_y.dtype == np.int64 and test_y.shape == (4,)
    assert check_data(compose_config(["data=fashion_mnist", f"data.root={tmp_path}"]).data) is None


def test_cifar_pickles_with_bytes_keys_read(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in CIFAR_FILES:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    train_x, train_y, test_x, _ = read_cifar10(tmp_path)
    assert train_x.shape == (15, 3, 32, 32) and test_x.shape == (3, 3, 32, 32)
    assert train_y.tolist() == [1, 2, 3] * 5


def test_a_missing_root_names_the_missing_file(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    cfg = compose_config(["data=cifar10", f"data.root={tmp_path}"]).data
    line = check_data(cfg)
    assert line.startswith(f"data.root={tmp_path} is invalid (")
    assert "data_batch_1 is missing" in line and "nothing is downloaded" in line


def test_digits_splits_are_disjoint_and_cover_the_set():
    data = ImageDataModule(compose_config([]).data)
    data.setup()
    sizes = [len(data.train_set), len(data.val_set), len(data.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == round(0.2 * 1797)
    x, y = data.train_set[0]
    assert x.shape == (1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0 and 0 <= int(y) < 10


def test_limits_and_augmentation():
    cfg = compose_config(["data.max_train_samples=100", "data.max_test_samples=50"]).data
    data = ImageDataModule(cfg)
    data.setup()
    assert (len(data.train_set), len(data.test_set)) == (100, 50)
    assert next(iter(data.train_dataloader()))[0].shape == (64, 1, 8, 8)


@pytest.mark.skipif(not (SHARED / "FashionMNIST").is_dir(), reason="no shared Fashion-MNIST")
def test_real_fashion_mnist():
    cfg = compose_config(["data=fashion_mnist", f"data.root={SHARED}", "data.max_test_samples=100"])
    data = ImageDataModule(cfg.data)
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 60000 and len(data.test_set) == 100
    assert sorted(set(data.test_set.labels.tolist())) == list(range(10))


@pytest.mark.skipif(not (SHARED / "cifar10-partial").is_dir(), reason="no shared CIFAR-10 subset")
def test_real_cifar10_subset():
    cfg = compose_config(["data=cifar10", f"data.root={SHARED / 'cifar10-partial'}"])
    data = ImageDataModule(cfg.data)
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 5000 and len(data.test_set) == 1000
    # Known pixels (shared/data/README.md): the first red values of each split's image 0.
    train_x, _, test_x, _ = read_cifar10(SHARED / "cifar10-partial")
    assert train_x[0, 0, 0, :3].tolist() == [59, 43, 50]
    assert test_x[0, 0, 0, :3].tolist() == [158, 159, 165]
