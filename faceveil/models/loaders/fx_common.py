"""Pieces shared by the fx-based loaders (ONNX, TFLite): float32 conversion and the channels-last input layout."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn


def f32(array: np.ndarray) -> torch.Tensor:
    """A float32 torch copy (own, writable, contiguous memory) of a numpy array."""
    return torch.tensor(np.asarray(array, dtype=np.float32))


class ChannelsLast(nn.Module):
    """Puts a 4-d input in channels_last memory layout (same values; faster convolutions on this CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def to_channels_last(module: fx.GraphModule) -> None:
    """Convert conv weights to channels_last and insert a layout change right after the input placeholder."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            sub.weight.data = sub.weight.data.contiguous(memory_format=torch.channels_last)
    graph = module.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    module.add_submodule("to_channels_last", ChannelsLast())
    with graph.inserting_after(placeholder):
        node = graph.call_module("to_channels_last", (placeholder,))
    placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    module.recompile()
