"""conv_transpose2d, the adjoint of conv2d: stride, padding, output_padding, dilation
and groups as torch.nn.functional.conv_transpose2d."""

from __future__ import annotations
