"""The three QAT sides of `peer_qat.py` as models built from one float ResNet-20 checkpoint:
ours (`quantize_model`), a torch.ao eager-mode twin with the same parameter names, and a
Brevitas twin (imported only when that side runs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.quantized import FloatFunctional

from qat_lightning.app.models import BasicBlock, ResNetCifar
from qat_lightning.surgery import quantize_model

# conf/quant/inputs/int8.yaml and conf/quant/params/int8.yaml
W8A8 = {
    "inputs": {"bits": 8, "symmetric": False, "signed": False, "observer": "moving_minmax"},
    "params": {"bits": 8, "symmetric": True, "granularity": "per_channel", "observer": "minmax"},
}


def float_model(state: dict) -> ResNetCifar:
    model = ResNetCifar(in_channels=3, num_classes=10)
    model.load_state_dict(state, strict=True)
    return model


class _AoBlock(BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.skip_add.add_relu(self.bn2(self.conv2(out)), self.shortcut(x))


class AoResNet(ResNetCifar):
    """ResNet-20 for torch.ao eager mode; same parameter names as `ResNetCifar`."""

    def __init__(self) -> None:
        super().__init__(in_channels=3, num_classes=10)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        for block in self.layers:
            block.__class__ = _AoBlock
            block.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(super().forward(self.quant(x)))

    def fuse(self) -> None:
        groups = [["conv1", "bn1", "relu"]]
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            groups += [[p + "conv1", p + "bn1", p + "relu1"], [p + "conv2", p + "bn2"]]
            if len(block.shortcut):
                groups.append([p + "shortcut.0", p + "shortcut.1"])
        tq.fuse_modules_qat(self, groups, inplace=True)


def torch_ao_model(state: dict) -> nn.Module:
    model = AoResNet()
    model.load_state_dict(state, strict=True)  # the same float checkpoint, every key
    model.train()
    model.fuse()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


def ours_model(state: dict) -> nn.Module:
    model = float_model(state)
    quantize_model(model, W8A8)
    return model


def brevitas_model(state: dict) -> nn.Module:
    """ResNet-20 with Brevitas layers, loaded from the float checkpoint (quantizers excepted)."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat as Int8Act
    from brevitas.quant import Int8WeightPerChannelFloat as Int8W
    from brevitas.quant import Uint8ActPerTensorFloat as Uint8Act

    class Block(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.out_quant(self.bn2(self.conv2(out)))
            return self.relu2(out + self.shortcut_quant(self.shortcut(x)))

    class Net(ResNetCifar):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(self.relu(self.bn1(self.conv1(self.in_quant(x)))))
            return self.out_quant(self.fc(self.pool_quant(torch.flatten(self.pool(x), 1))))

    model = Net(in_channels=3, num_classes=10)
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Conv2d):
            new = qnn.QuantConv2d(
                module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, bias=False, weight_quant=Int8W,
            )  # fmt: skip
        elif isinstance(module, nn.Linear):
            new = qnn.QuantLinear(module.in_features, module.out_features, True, weight_quant=Int8W)
        elif isinstance(module, nn.ReLU):
            new = qnn.QuantReLU(act_quant=Uint8Act)
        else:
            continue
        setattr(model.get_submodule(parent), leaf, new)
    for block in model.layers:
        block.__class__ = Block
        block.out_quant = qnn.QuantIdentity(act_quant=Int8Act)
        block.shortcut_quant = qnn.QuantIdentity(Int8Act) if len(block.shortcut) else nn.Identity()
    model.in_quant = qnn.QuantIdentity(act_quant=Int8Act)
    model.pool_quant = qnn.QuantIdentity(act_quant=Uint8Act)
    model.out_quant = qnn.QuantIdentity(act_quant=Int8Act)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("quant" not in key for key in missing):
        raise RuntimeError(f"float checkpoint does not fit: {missing=} {unexpected=}")
    return model
