"""Atomic file writes: a temp file in the target's directory, then ``os.replace``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


class ExportError(RuntimeError):
    """An export or save failed; no half-written file was left behind."""


def _temp_beside(path: Path, what: str) -> Path:
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise ExportError(
            f"{what}: cannot write {str(path)!r}: the directory {str(directory)!r} is not "
            f"writable ({error.strerror or error})"
        ) from error
    os.close(fd)
    os.chmod(name, 0o644)
    return Path(name)


@contextmanager
def atomic_paths(paths: list[Path], what: str) -> Iterator[list[Path]]:
    """Temp paths beside ``paths``; on success each replaces its target, on failure all are
    removed (so the targets are either the old files or complete new ones).

    Example:
        >>> with atomic_paths([Path("out/model.onnx")], "export_onnx") as (tmp,):
        ...     write(tmp)
    """
    temps: list[Path] = []
    with ExitStack() as cleanup:
        cleanup.callback(lambda: [t.unlink(missing_ok=True) for t in temps])
        for path in paths:
            temps.append(_temp_beside(Path(path), what))
        yield temps
        for temp, path in zip(temps, paths, strict=True):
            try:
                os.replace(temp, path)
            except OSError as error:
                raise ExportError(f"{what}: cannot write {str(path)!r} ({error})") from error
