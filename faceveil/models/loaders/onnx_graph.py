"""ONNX graph -> PyTorch, written for the small CNN face recognisers we ship (mfn512: `fr_feature.onnx`).

The graph is read with the `onnx` package and compiled into a `torch.fx.GraphModule` made of real layers
(`nn.Conv2d`, `nn.Linear`, `nn.PReLU`, ...): BatchNormalization following a Conv is folded into the conv, Gemm
and MatMul with constant weights become `nn.Linear`. A Reshape whose target shape hard-codes the file's batch
size (mfn512 ends in Reshape [1, -1]) is compiled to a per-sample reshape, so any batch size works.

The module takes the NCHW float32 batch that onnxruntime is fed (for mfn512: RGB 112x112, (x - 127) / 128) and
returns the graph's single output. Parameters are frozen (`requires_grad=False`): gradients reach the input
only.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper
from torch import nn

from faceveil.errors import FaceveilError
from faceveil.models.loaders.fx_common import f32, to_channels_last
from faceveil.models.prelu import PReLU

__all__ = ["load_onnx", "OnnxConversionError"]



class OnnxConversionError(FaceveilError):
    """The ONNX file uses something this small converter does not support."""


class BatchReshape(nn.Module):
    """Reshape that keeps dim 0 (the batch) and reshapes each sample to `rest` (ONNX 0 = copy that dim)."""

    def __init__(self, rest: tuple[int, ...]) -> None:
        super().__init__()
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rest == (-1,):
            return torch.flatten(x, 1)
        dims = [x.shape[i + 1] if d == 0 else d for i, d in enumerate(self.rest)]
        return x.reshape(x.shape[0], *dims)

    def extra_repr(self) -> str:
        return f"rest={self.rest}"



def load_onnx(path: str | Path, *, channels_last: bool = True) -> nn.Module:
    """Compile the ONNX file at `path` (one input, one output) into an eval-mode `nn.Module`."""
    if not Path(path).is_file():
        raise OnnxConversionError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise OnnxConversionError(f"{path} is not a readable ONNX model ({exc})") from exc
    module = _Builder(model.graph).build()
    module.eval().requires_grad_(False)
    if channels_last:
        to_channels_last(module)
    return module



class _Builder:
    """Walks the ONNX nodes in order and emits fx nodes; `self.env` maps ONNX value names to fx nodes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.onnx_graph = graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.graph = fx.Graph()
        self.root: dict[str, nn.Module | torch.Tensor] = {}
        self.env: dict[str, fx.Node] = {}
        self.batch = 1

    def build(self) -> fx.GraphModule:
        inputs = [i for i in self.onnx_graph.input if i.name not in self.consts]
        if len(inputs) != 1 or len(self.onnx_graph.output) != 1:
            raise OnnxConversionError("only graphs with one input and one output are supported")
        dims = inputs[0].type.tensor_type.shape.dim
        self.batch = dims[0].dim_value if dims and dims[0].dim_value > 0 else 1
        self.env[inputs[0].name] = self.graph.placeholder("x")
        for node in self.onnx_graph.node:
            if not all(name in self.env for name in node.output):  # else folded into an earlier node
                self._emit(node)
        self.graph.output(self.env[self.onnx_graph.output[0].name])
        module = fx.GraphModule(self.root, self.graph, class_name="OnnxGraph")
        return module

    # ---------------------------------------------------------------- helpers
    def _emit(self, node: onnx.NodeProto) -> None:
        handler = _HANDLERS.get(node.op_type)
        if handler is None:
            raise OnnxConversionError(f"ONNX op {node.op_type} (node {node.name}) is not supported")
        result = handler(self, node)
        if result is not None:
            self.env[node.output[0]] = result

    def _module(self, stem: str, module: nn.Module, *args: fx.Node) -> fx.Node:
        name = f"{stem}_{len(self.root)}"
        self.root[name] = module
        return self.graph.call_module(name, args)

    def _value(self, name: str) -> fx.Node:
        """The fx node for a dynamic value, or a buffer for a constant one."""
        if name in self.env:
            return self.env[name]
        if name not in self.consts:
            raise OnnxConversionError(f"ONNX value {name} is used before it is defined")
        key = f"const_{len(self.root)}"
        self.root[key] = torch.tensor(self.consts[name])
        self.env[name] = self.graph.get_attr(key)
        return self.env[name]

    def _sole_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and name not in self.outputs:
            return users[0]
        return None

    def _const(self, name: str) -> np.ndarray:
        if name not in self.consts:
            raise OnnxConversionError(f"ONNX value {name} must be a constant for this converter")
        return self.consts[name]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# -------------------------------------------------------------------- op handlers
def _conv(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    at = _attrs(node)
    weight = b._const(node.input[1]).astype(np.float64)
    bias = b._const(node.input[2]).astype(np.float64) if len(node.input) > 2 else np.zeros(weight.shape[0])
    bn = b._sole_consumer(node.output[0], "BatchNormalization")
    if bn is not None:
        weight, bias = _fold_bn(b, bn, weight, bias)
    if weight.ndim != 4:
        raise OnnxConversionError(f"Conv {node.name}: only 2-d convolutions are supported")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise OnnxConversionError(f"Conv {node.name}: auto_pad {at['auto_pad']} is not supported")
    conv = nn.Conv2d(
        weight.shape[1] * at.get("group", 1), weight.shape[0], tuple(weight.shape[2:]),
        stride=tuple(at.get("strides", [1, 1])), dilation=tuple(at.get("dilations", [1, 1])),
        groups=at.get("group", 1), padding=(pads[0], pads[1]) if pads[:2] == pads[2:] else 0,
    )
    conv.weight.data = f32(weight)
    conv.bias.data = f32(bias)
    x = b._value(node.input[0])
    if pads[:2] != pads[2:]:  # ONNX order: top, left, bottom, right
        x = b._module("pad", nn.ZeroPad2d((pads[1], pads[3], pads[0], pads[2])), x)
    out = b._module("conv", conv, x)
    if bn is not None:
        b.env[bn.output[0]] = out
    return out


def _fold_bn(b: _Builder, bn: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, ...]:
    gamma, beta, mean, var = (b._const(n).astype(np.float64) for n in bn.input[1:5])
    scale = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5))
    return weight * scale.reshape(-1, 1, 1, 1), (bias - mean) * scale + beta


def _batchnorm(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    gamma, beta, mean, var = (b._const(n) for n in node.input[1:5])
    bn = nn.BatchNorm2d(gamma.shape[0], eps=_attrs(node).get("epsilon", 1e-5))
    for tensor, value in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var),
                             (gamma, beta, mean, var), strict=True):
        tensor.data = f32(value)
    return b._module("bn", bn, b._value(node.input[0]))


def _prelu(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    slope = b._const(node.input[1]).astype(np.float32)
    x = b._value(node.input[0])
    trailing = slope.shape[-2:] if slope.ndim >= 3 else ()
    per_channel = slope.ndim >= 3 and trailing == (1, 1) and slope.size == slope.shape[-3]
    if slope.size == 1 or per_channel:  # one slope, or (C, 1, 1) broadcast over NCHW: a real nn.PReLU
        return b._module("prelu", PReLU(f32(slope)), x)
    neg = b.graph.call_function(torch.mul, (x, b._value(node.input[1])))
    return b.graph.call_function(torch.where, (b.graph.call_function(operator.gt, (x, 0.0)), x, neg))


def _gemm(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    at = _attrs(node)
    if at.get("transA", 0):
        raise OnnxConversionError(f"Gemm {node.name}: transA is not supported")
    weight = b._const(node.input[1]).astype(np.float64)
    weight = (weight if at.get("transB", 0) else weight.T) * at.get("alpha", 1.0)
    bias = np.zeros(weight.shape[0])
    if len(node.input) > 2 and node.input[2]:
        bias = np.broadcast_to(b._const(node.input[2]) * at.get("beta", 1.0), (weight.shape[0],))
    return b._module("linear", _linear(weight, bias), b._value(node.input[0]))


def _matmul(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    if node.input[1] not in b.consts or b.consts[node.input[1]].ndim != 2:
        return b.graph.call_function(torch.matmul, (b._value(node.input[0]), b._value(node.input[1])))
    weight = b.consts[node.input[1]].astype(np.float64).T
    return b._module("linear", _linear(weight, np.zeros(weight.shape[0])), b._value(node.input[0]))


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data = f32(weight)
    linear.bias.data = f32(bias)
    return linear


def _reshape(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    shape = [int(d) for d in b._const(node.input[1]).reshape(-1)]
    if not shape or shape[0] not in (b.batch, 0, -1) or (shape[0] == -1 and -1 in shape[1:]):
        raise OnnxConversionError(f"Reshape {node.name}: target {shape} does not keep the batch dimension")
    return b._module("reshape", BatchReshape(tuple(shape[1:])), b._value(node.input[0]))


def _flatten(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    if _attrs(node).get("axis", 1) != 1:
        raise OnnxConversionError(f"Flatten {node.name}: only axis=1 is supported")
    return b._module("reshape", BatchReshape((-1,)), b._value(node.input[0]))


def _binary(fn: Callable) -> Callable[[_Builder, onnx.NodeProto], fx.Node]:
    def handler(b: _Builder, node: onnx.NodeProto) -> fx.Node:
        return b.graph.call_function(fn, (b._value(node.input[0]), b._value(node.input[1])))

    return handler


def _unary(make: Callable[[], nn.Module], stem: str) -> Callable[[_Builder, onnx.NodeProto], fx.Node]:
    def handler(b: _Builder, node: onnx.NodeProto) -> fx.Node:
        return b._module(stem, make(), b._value(node.input[0]))

    return handler


def _constant(b: _Builder, node: onnx.NodeProto) -> None:
    b.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])


def _identity(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    return b._value(node.input[0])


_HANDLERS: dict[str, Callable[[_Builder, onnx.NodeProto], fx.Node | None]] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "PRelu": _prelu,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Relu": _unary(nn.ReLU, "relu"),
    "Sigmoid": _unary(nn.Sigmoid, "sigmoid"),
    "Tanh": _unary(nn.Tanh, "tanh"),
    "GlobalAveragePool": _unary(lambda: nn.AdaptiveAvgPool2d(1), "gap"),
    "Constant": _constant,
    "Identity": _identity,
}
