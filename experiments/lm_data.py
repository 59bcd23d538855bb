"""A byte-level language-modelling corpus every machine has offline: the standard library.

The corpus is the running interpreter's own ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages`` / ``dist-packages`` left out), read as
bytes: the vocabulary is the 256 byte values, nothing is tokenized and nothing is downloaded.

Files, not windows, are split: a file's split is fixed by the SHA-256 of its path relative to
the stdlib root (``train`` / ``val`` / ``test`` by ``TRAIN_SHARE`` / ``VAL_SHARE``), so the
split is the same on every run and machine with the same Python, and no file's text is in two
splits. Each split is its files' bytes in sorted path order, joined by a blank line.

Samples are fixed-length windows of ``length + 1`` bytes (input = first ``length``, target =
the last ``length``), non-overlapping, from the start of the split's stream. Training
shuffles them by seed and epoch (`EpochShuffle`); validation and test take ``eval_windows``
of them evenly spread over the stream, in order, so every evaluation sees the same bytes.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

SPLITS = ("train", "val", "test")
TRAIN_SHARE, VAL_SHARE = 0.90, 0.05  # of the files, by path hash; the rest is test
_SEPARATOR = b"\n\n"
_EXCLUDED = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split (``train`` / ``val`` / ``test``) of a file, from the SHA-256 of its path
    relative to the stdlib root (POSIX separators)."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < TRAIN_SHARE else "val" if u < TRAIN_SHARE + VAL_SHARE else "test"


def stdlib_files(root: Path | None = None) -> dict[str, list[Path]]:
    """The ``.py`` files of each split, sorted by relative path."""
    root = stdlib_root() if root is None else Path(root)
    files: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        if _EXCLUDED.intersection(relative.parts) or not path.is_file():
            continue
        files[split_of(relative.as_posix())].append(path)
    if not any(files.values()):
        raise FileNotFoundError(f"no .py files under the stdlib root {root}")
    return files


def split_bytes(split: str, root: Path | None = None, max_bytes: int | None = None) -> bytes:
    """The byte stream of ``split``: its files in order, joined by a blank line, cut at
    ``max_bytes`` (None: all; files past the cut are not read)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed {SPLITS}")
    chunks, size = [], 0
    for path in stdlib_files(root)[split]:
        if max_bytes is not None and size >= max_bytes:
            break
        data = path.read_bytes() + _SEPARATOR
        chunks.append(data)
        size += len(data)
    stream = b"".join(chunks)
    return stream if max_bytes is None else stream[:max_bytes]


class ByteWindows(Dataset):
    """Non-overlapping windows of ``length + 1`` bytes of a stream, as ``(input, target)``
    int64 pairs of ``length`` each; ``indices`` picks which windows (None: all)."""

    def __init__(self, stream: bytes, length: int, indices: list[int] | None = None) -> None:
        if length < 1:
            raise ValueError(f"length={length} is invalid: allowed >= 1")
        self.data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
        self.length = length
        count = (len(stream) - 1) // length
        if count < 1:
            raise ValueError(
                f"the stream has {len(stream)} bytes, fewer than one window of {length + 1}"
            )
        self.indices = list(range(count)) if indices is None else [i % count for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.indices[i] * self.length
        chunk = self.data[start : start + self.length + 1].long()
        return chunk[:-1], chunk[1:]


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(count)`` fixed by ``seed`` and the epoch (`set_epoch`, which
    Lightning calls at each epoch's start), not by how often it was iterated before: a
    callback that reads a few batches before training (calibration) leaves the training
    order as it is, so every run with the same seed sees the same batches."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed, self.epoch = count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.count, generator=generator).tolist())


def evenly_spread(count: int, wanted: int | None) -> list[int] | None:
    """``wanted`` window indices evenly spread over ``count`` (None: all of them)."""
    if wanted is None or wanted >= count:
        return None
    return [round(i * (count - 1) / max(wanted - 1, 1)) for i in range(wanted)]


class StdlibCorpus:
    """Train/val/test loaders of byte windows of the stdlib's ``.py`` files.

    Args:
        length: tokens (bytes) per window.
        batch_size: windows per batch.
        eval_windows: windows for validation and for test, evenly spread (None: all).
        max_bytes: cut each split's stream at this many bytes (None: whole split); the smoke
            test's few hundred bytes.
        seed: the training order's generator seed.
        root: the stdlib directory (None: the running interpreter's).
    """

    def __init__(
        self,
        length: int = 128,
        batch_size: int = 16,
        eval_windows: int | None = 64,
        max_bytes: int | None = None,
        seed: int = 0,
        root: Path | None = None,
    ) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.streams = {s: split_bytes(s, root, max_bytes) for s in SPLITS}
        self.train = ByteWindows(self.streams["train"], length)
        self.eval = {}
        for split in ("val", "test"):
            count = (len(self.streams[split]) - 1) // length
            self.eval[split] = ByteWindows(
                self.streams[split], length, evenly_spread(count, eval_windows)
            )

    def sizes(self) -> dict[str, int]:
        """Bytes per split (after ``max_bytes``)."""
        return {s: len(v) for s, v in self.streams.items()}

    def train_loader(self) -> DataLoader:
        """Shuffled training windows, each epoch's order fixed by ``seed`` and the epoch."""
        sampler = EpochShuffle(len(self.train), self.seed)
        return DataLoader(self.train, self.batch_size, sampler=sampler, drop_last=True)

    def eval_loader(self, split: str) -> DataLoader:
        """The fixed validation or test windows, in order."""
        return DataLoader(self.eval[split], self.batch_size, shuffle=False)
