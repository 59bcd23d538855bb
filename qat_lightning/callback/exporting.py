"""The end-of-fit export: integer ONNX and the native artifact, with paths and sizes printed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn


class QATExportError(RuntimeError):
    """The fit finished (its checkpoints are written) but the integer export failed."""


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_trained(
    model: nn.Module,
    example_input: torch.Tensor | None,
    out_dir: Path,
    formats: Sequence[str],
    config: Any = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Export ``model`` in each of ``formats`` to ``out_dir``, with a model card
    (``README.md``, showing ``metrics`` when given); returns ``{format: path}``.

    Raises:
        QATExportError: naming the format that failed and why. Files already written by the
            export functions are complete (they write atomically); nothing is half-written.
    """
    from qat_lightning.export import export_onnx, save_quantized, write_model_card

    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    was_training = model.training
    model.eval()
    try:
        for fmt in formats:
            try:
                if fmt == "onnx":
                    if example_input is None:
                        raise ValueError(
                            "no example input: pass QATCallback(example_input=...) (the model's "
                            "forward was never called with a tensor during calibration)"
                        )
                    out_dir.mkdir(parents=True, exist_ok=True)
                    device = next(model.parameters()).device
                    paths[fmt] = Path(
                        export_onnx(
                            model,
                            example_input.to(device),
                            out_dir / "model_int.onnx",
                            metadata={"metrics": metrics} if metrics else None,
                        )
                    )
                elif fmt == "native":
                    paths[fmt] = Path(save_quantized(model, out_dir / "native", config=config))
            except Exception as error:
                raise QATExportError(
                    f"QATCallback: exporting {fmt!r} to {out_dir} failed: {error}. The fit's "
                    "checkpoints are intact."
                ) from error
        if paths:
            try:
                card = write_model_card(out_dir, model, paths, metrics)
            except Exception as error:
                raise QATExportError(
                    f"QATCallback: writing the model card {out_dir / 'README.md'} failed: "
                    f"{error}. The exported files and the fit's checkpoints are intact."
                ) from error
    finally:
        model.train(was_training)
    for fmt, path in paths.items():
        rank_zero_info(f"QATCallback: exported {fmt}: {path} ({_size(path) / 1024:.1f} KiB)")
    if paths:
        rank_zero_info(f"QATCallback: model card: {card}")
    return paths
