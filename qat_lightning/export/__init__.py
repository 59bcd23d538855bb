"""Export: a calibrated QAT model -> integer model, QDQ ONNX and a native artifact.

- `convert(model)`: integer weights (BN folded), integer simulation as a module.
- `export_onnx(model, example_input, path)`: QDQ ONNX that onnxruntime runs with integer kernels;
  ``example_input`` a tensor, tuple (positional) or dict (keyword); one input per tensor
  argument, named after the forward's parameters, with dynamic batch (and sequence) axes;
  outputs ``logits``; schemes and inputs in its metadata.
- `OnnxModel(path)(x) -> torch.Tensor`: run that file in onnxruntime (CPU), inputs by
  position or keyword as the model's forward takes them.
- `write_model_card(dir, model, paths)`: the export directory's ``README.md``.
- `save_quantized(model, dir)` / `load_quantized(dir, model)`: safetensors + encodings JSON +
  layer report. The artifact holds tensors, not code: `load_quantized` takes the architecture
  (a fresh float model, quantized again with the saved config, or a QAT model) and returns a
  converted model whose outputs are bit-identical to the saved one.
"""

from qat_lightning.export._files import ExportError
from qat_lightning.export.artifact import encodings, load_quantized, save_quantized
from qat_lightning.export.convert import NotCalibratedError, check_calibrated, convert, is_converted
from qat_lightning.export.example_input import ExampleInput
from qat_lightning.export.model_card import write_model_card
from qat_lightning.export.onnx import export_onnx
from qat_lightning.export.report import layer_report
from qat_lightning.export.runtime import OnnxModel

__all__ = [
    "ExampleInput",
    "ExportError",
    "NotCalibratedError",
    "OnnxModel",
    "check_calibrated",
    "convert",
    "encodings",
    "export_onnx",
    "is_converted",
    "layer_report",
    "load_quantized",
    "save_quantized",
    "write_model_card",
]
