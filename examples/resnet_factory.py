"""A tiny ResNet in plain PyTorch, as `remat compare --torch` and `--onnx` take it.

    remat compare --torch examples/resnet_factory.py:make_model
    remat plan --torch examples/resnet_factory.py:make_model --policy sqrt

    python examples/resnet_factory.py resnet.onnx     # the same model as an ONNX file
    remat compare --onnx resnet.onnx --batch 16

`make_model()` returns `(module, example_args)`: the module (in train() mode, so
BatchNorm normalizes with batch statistics as in a training step) and the example
inputs that fix the shapes remat plans for. Seeded: every call builds the same model.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

BATCH, IMAGE, CLASSES = 16, 32, 10


class Block(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a shortcut (a 1x1 conv where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, three stages of two blocks (widths w, 2w, 4w), global average pooling
    and a linear classifier."""

    def __init__(self, width: int = 16, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            stages += [Block(c_in, c_out, stride=1 if i == 0 else 2), Block(c_out, c_out)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_model(batch: int = BATCH):
    """(the model, (a batch of images,)), seeded."""
    torch.manual_seed(0)
    return ResNet().train(), (torch.randn(batch, 3, IMAGE, IMAGE),)


def export_onnx(path: str) -> None:
    """Write the model to `path` as ONNX, with a dynamic batch dimension."""
    model, args = make_model()
    torch.onnx.export(
        model,
        args,
        path,
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT.onnx")
    export_onnx(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
