"""torchvision's ImageNet backbones as U-Net encoders: one line of `ENCODERS` each.

An encoder keeps the backbone's own modules under their own names (`encoder.layer1.0.conv1.
weight` is torchvision's `layer1.0.conv1.weight`), so a torchvision state dict loads as it is;
the classifier and anything after the last stage are dropped. A stage is the list of modules
run in turn, and its output is one feature of the pyramid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from train.models.registry import register_model
from train.models.unet import DECODER_WIDTHS, Encoder, EncoderUNet
from train.models.weights import file_state_dict, imagenet_state_dict, load_weights

Stages = tuple[tuple[str, ...], ...]
RESNET: Stages = (("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",),
                  ("layer4",))
CONVNEXT: Stages = (("features.0", "features.1"), ("features.2", "features.3"),  # no /2
                    ("features.4", "features.5"), ("features.6", "features.7"))
EFFICIENTNET: Stages = (("features.0", "features.1"), ("features.2",), ("features.3",),
                        ("features.4", "features.5"), ("features.6",))
REGNET: Stages = (("stem",), ("trunk_output.block1",), ("trunk_output.block2",),
                  ("trunk_output.block3",), ("trunk_output.block4",))


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., nn.Module]  # torchvision's builder, called with weights=None
    weights: tvm.WeightsEnum  # what --weights imagenet loads
    stages: Stages


ENCODERS = {
    "resnet18": Backbone(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, RESNET),
    "resnet34": Backbone(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, RESNET),
    "resnet50": Backbone(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, RESNET),
    "resnet101": Backbone(tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V2, RESNET),
    "resnext50_32x4d": Backbone(tvm.resnext50_32x4d,
                                tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V2, RESNET),
    "convnext_tiny": Backbone(tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
                              CONVNEXT),
    "convnext_small": Backbone(tvm.convnext_small, tvm.ConvNeXt_Small_Weights.IMAGENET1K_V1,
                               CONVNEXT),
    "efficientnet_v2_s": Backbone(tvm.efficientnet_v2_s,
                                  tvm.EfficientNet_V2_S_Weights.IMAGENET1K_V1, EFFICIENTNET),
    "regnet_y_1_6gf": Backbone(tvm.regnet_y_1_6gf, tvm.RegNet_Y_1_6GF_Weights.IMAGENET1K_V2,
                               REGNET),
    "regnet_y_3_2gf": Backbone(tvm.regnet_y_3_2gf, tvm.RegNet_Y_3_2GF_Weights.IMAGENET1K_V2,
                               REGNET),
}


def _child(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)  # read at each call: SyncBatchNorm swaps modules in
    return module


class TorchvisionEncoder(Encoder):
    def __init__(self, backbone: nn.Module, stages: Stages) -> None:
        super().__init__()
        self.stages = stages
        used = {p for stage in stages for p in stage}
        for name, child in backbone.named_children():
            inside = [p.split(".")[1] for p in used if p.startswith(name + ".")]
            if name in used or (inside and not all(i.isdigit() for i in inside)):
                self.add_module(name, child)
            elif inside:  # a numbered Sequential: drop what follows the last stage, or DDP
                # would wait for gradients of parameters that get none
                self.add_module(name, nn.Sequential(*list(child)[:max(map(int, inside)) + 1]))
        with torch.no_grad():  # the channels and strides, read off a small forward pass
            was = self.training
            features = self.eval().forward(torch.zeros(1, 3, 64, 64))
            self.train(was)
        self.channels = [f.shape[1] for f in features]
        self.strides = [64 // f.shape[-1] for f in features]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            for path in stage:
                x = _child(self, path)(x)
            features.append(x)
        return features


def build_encoder_unet(name: str, num_classes: int, *, weights: str = "none",
                       decoder: tuple[int, ...] = DECODER_WIDTHS) -> EncoderUNet:
    """`name`'s backbone with `weights` ("imagenet", "none" or a state dict file's path)."""
    spec = ENCODERS[name]
    backbone = spec.build(weights=None)
    if weights == "imagenet":
        load_weights(backbone, imagenet_state_dict(spec.weights), str(spec.weights))
    elif weights != "none":
        load_weights(backbone, file_state_dict(Path(weights)), weights)
    if weights == "none":
        normalization = None  # from scratch: the dataset's own statistics serve best
    else:
        preset = spec.weights.transforms()
        # a file is taken to hold ImageNet-trained weights of torchvision's, as its own do
        normalization = {"weights": str(spec.weights) if weights == "imagenet" else weights,
                         "mean": list(preset.mean), "std": list(preset.std)}
    config = {"encoder": name, "num_classes": num_classes, "decoder": list(decoder)}
    return EncoderUNet(TorchvisionEncoder(backbone, spec.stages), num_classes, config=config,
                       decoder=tuple(decoder), normalization=normalization)


for _name, _spec in ENCODERS.items():
    register_model(_name, weights=_spec.weights)(functools.partial(build_encoder_unet, _name))
