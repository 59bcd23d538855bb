"""Atomic writes: a temp file (or directory) beside the target, then one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def _fresh_name(directory: Path, prefix: str, suffix: str) -> Path:
    """A name beside ``directory`` that nothing uses (made and removed by mkdtemp)."""
    name = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix, suffix=suffix))
    name.rmdir()
    return name


@contextmanager
def atomic_directory(
    directory: Path, what: str, replaceable: Callable[[Path], bool]
) -> Iterator[Path]:
    """A temp directory beside ``directory``, published whole on success.

    On success the temp directory is renamed to ``directory``. An existing ``directory`` is
    replaced only if ``replaceable(directory)`` (e.g. it is empty or an earlier artifact): it
    is renamed aside, the new one renamed in, then the old one removed, so a reader sees the
    old directory or the new one, never a mix (a kill between the two renames leaves no
    ``directory`` and the old one aside, never a mixed one). On failure the temp directory is
    removed, and ``directory`` is untouched.

    Raises:
        ExportError: the parent is not writable, ``directory`` is a file or a directory that
            is not ``replaceable``, or a rename failed.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{what}: {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and not replaceable(directory):
        raise ExportError(
            f"{what}: {str(directory)!r} holds files that are not an artifact "
            f"({sorted(p.name for p in directory.iterdir())[:5]}); choose an empty or new "
            "directory, or the directory of an earlier artifact"
        )
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    except OSError as error:
        raise ExportError(
            f"{what}: cannot write {str(directory)!r}: the directory "
            f"{str(directory.parent)!r} is not writable ({error.strerror or error})"
        ) from error
    try:
        os.chmod(temp, 0o755)
        yield temp
        old = None
        if directory.is_dir():
            old = _fresh_name(directory, f".{directory.name}.", ".old")
            os.rename(directory, old)
        try:
            os.rename(temp, directory)
        except OSError:
            if old is not None:
                os.rename(old, directory)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise ExportError(f"{what}: cannot write {str(directory)!r} ({error})") from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)
