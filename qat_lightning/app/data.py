"""Data sets: scikit-learn's digits (the default, offline), Fashion-MNIST and CIFAR-10.

Fashion-MNIST and CIFAR-10 are read from ``data.root`` with the small numpy readers below, in
torchvision's layout, and are never downloaded:

- Fashion-MNIST: ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
  (the unpacked IDX files or the ``.gz`` ones);
- CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the python pickles;
  any number of images per batch, so a partial copy works).

This module needs only numpy, so a config check reads it without importing torch or Lightning;
`qat_lightning.app.datamodule` builds the Lightning data module on top.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@dataclass(frozen=True)
class DatasetInfo:
    in_channels: int
    image_size: int
    num_classes: int
    scale: float  # raw pixel value of 1.0
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS = {
    "digits": DatasetInfo(1, 8, 10, 16.0, (0.0,), (1.0,)),
    "fashion_mnist": DatasetInfo(1, 28, 10, 255.0, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(3, 32, 10, 255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


# -- readers -------------------------------------------------------------------------------------
def _idx_path(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as an array of its shape."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08 or not 1 <= magic & 0xFF <= 4:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def read_fashion_mnist(root: Path) -> tuple[np.ndarray, ...]:
    """(train images N x 1 x 28 x 28, train labels, test images, test labels), uint8/int64."""
    raw = Path(root) / "FashionMNIST" / "raw"
    arrays = [read_idx(_idx_path(raw, name)) for name in FASHION_FILES]
    train_x, train_y, test_x, test_y = arrays
    return train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch: dict[Any, Any] = pickle.load(f, encoding="latin1")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch["labels"], dtype=np.int64)


def read_cifar10(root: Path) -> tuple[np.ndarray, ...]:
    """(train images N x 3 x 32 x 32, train labels, test images, test labels), uint8/int64."""
    folder = Path(root) / "cifar-10-batches-py"
    train = [_read_cifar_batch(folder / name) for name in CIFAR_FILES[:-1]]
    test_x, test_y = _read_cifar_batch(folder / CIFAR_FILES[-1])
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images N x 1 x 8 x 8 (values 0..16, uint8) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8)[:, None], digits.target.astype(np.int64)


def check_data(cfg: Any) -> str | None:
    """None if ``cfg`` (the ``data`` node) can be loaded, else one line saying what is wrong."""
    if cfg.name == "digits":
        return None
    root = Path(str(cfg.root)).expanduser()
    if cfg.name == "fashion_mnist":
        where, folder = "FashionMNIST/raw/ with the 4 IDX files", root / "FashionMNIST" / "raw"
        missing = [n for n in FASHION_FILES if _idx_path(folder, n) is None]
    else:
        where = "cifar-10-batches-py/ with data_batch_1..5 and test_batch"
        folder = root / "cifar-10-batches-py"
        missing = [n for n in CIFAR_FILES if not (folder / n).is_file()]
    if not root.is_dir():
        problem = "no such directory"
    elif missing:
        problem = f"{folder / missing[0]} is missing"
    else:
        return None
    return (
        f"data.root={cfg.root} is invalid ({problem}): allowed a directory holding {where} "
        "(nothing is downloaded; set data.root=... or QAT_DATA_ROOT)"
    )
