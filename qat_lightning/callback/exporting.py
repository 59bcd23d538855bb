"""The end-of-fit export: integer ONNX and the native artifact, with paths and sizes printed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qat_lightning.export.example_input import ExampleInput
from qat_lightning.surgery.modes import kept_modes


class QATExportError(RuntimeError):
    """The fit finished (its checkpoints are written) but the integer export failed."""


def export_size(path: Path) -> int:
    """Bytes of a file, or of every file in a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_trained(
    model: nn.Module,
    example_input: ExampleInput | None,
    out_dir: Path,
    formats: Sequence[str],
    config: Any = None,
    metrics: dict[str, Any] | None = None,
    written: dict[str, Path] | None = None,
    why_no_input: str | None = None,
) -> dict[str, Path]:
    """Export ``model`` in each of ``formats`` to ``out_dir``, with a model card
    (``README.md``, showing ``metrics`` when given); returns ``{format: path}``.

    Args:
        written: a dict filled with ``{format: path}`` as each format is written, so that the
            caller knows what exists when a later format fails.
        why_no_input: why no example input was captured, for the error when there is none.

    Raises:
        QATExportError: naming the format that failed and why. Files already written by the
            export functions are complete (they write atomically); nothing is half-written.
    """
    from qat_lightning.export import export_onnx, save_quantized, write_model_card

    out_dir = Path(out_dir)
    paths: dict[str, Path] = {} if written is None else written
    with kept_modes(model):
        for fmt in formats:
            try:
                if fmt == "onnx":
                    if example_input is None:
                        why = why_no_input or "the model's forward was not called in calibration"
                        raise ValueError(
                            f"no example input ({why}): pass QATCallback(example_input=...)"
                        )
                    out_dir.mkdir(parents=True, exist_ok=True)
                    paths[fmt] = Path(
                        export_onnx(
                            model,
                            example_input,
                            out_dir / "model_int.onnx",
                            metadata={"metrics": metrics} if metrics else None,
                        )
                    )
                elif fmt == "native":
                    paths[fmt] = Path(save_quantized(model, out_dir / "native", config=config))
            except Exception as error:
                done = f" ({', '.join(paths)} written)" if paths else ""
                raise QATExportError(
                    f"QATCallback: exporting {fmt!r} to {out_dir} failed: {error}. The fit's "
                    f"checkpoints are intact{done}."
                ) from error
        if paths:
            try:
                write_model_card(out_dir, model, paths, metrics)
            except Exception as error:
                raise QATExportError(
                    f"QATCallback: writing the model card {out_dir / 'README.md'} failed: "
                    f"{error}. The exported files and the fit's checkpoints are intact."
                ) from error
    return paths
