"""TensorFlow Lite flatbuffer -> PyTorch, for float32 face recognisers (mfn192: `MobileFaceNet.tflite`).

The flatbuffer is read with the PyPI `tflite` package and compiled into a `torch.fx.GraphModule` of real
layers: CONV_2D / DEPTHWISE_CONV_2D become `nn.Conv2d` (OHWI / 1HWC weights permuted to OIHW, TFLite SAME
padding made explicit, asymmetric where TFLite pads more at the bottom/right), FULLY_CONNECTED becomes
`nn.Linear`, fused activations become modules. The exported-TF PReLU idiom `relu(x) + m * (x - |x|)` (RELU,
ABS, SUB, MUL, ADD) is fused into one `nn.PReLU` with slope 2m: for x < 0 both give exactly (2m)x, doubling
being exact in floating point, so the fusion changes no bit of the result.

Tensors of rank 4 live in NCHW inside the module. The module takes the NCHW float32 batch holding the values
TFLite is fed (TFLite's input is NHWC: the caller's NHWC array transposed with (0, 3, 1, 2)); a rank-4 output
is returned NHWC like TFLite's. A RESHAPE whose target hard-codes the file's batch size (mfn192 fixes batch
2) keeps dim 0 instead, so any batch size works. Parameters are frozen (`requires_grad=False`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tflite
import torch
import torch.fx as fx
from torch import nn

from faceveil.errors import FaceveilError
from faceveil.models.loaders.fx_common import f32, to_channels_last
from faceveil.models.prelu import PReLU

__all__ = ["load_tflite", "TfliteConversionError"]

_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_DTYPES = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.FLOAT16: np.float16,
           tflite.TensorType.INT32: np.int32, tflite.TensorType.INT64: np.int64}
_NHWC_TO_NCHW = (0, 3, 1, 2)



class TfliteConversionError(FaceveilError):
    """The TFLite file uses something this small converter does not support."""


class NhwcReshape(nn.Module):
    """TFLite RESHAPE on NCHW-held tensors: reshape in NHWC order, keep dim 0 (the batch), give back NCHW."""

    def __init__(self, rest: tuple[int, ...], in_4d: bool, out_4d: bool) -> None:
        super().__init__()
        self.rest, self.in_4d, self.out_4d = rest, in_4d, out_4d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_1x1 = self.in_4d and x.shape[2] == 1 and x.shape[3] == 1
        if self.in_4d and not (spatial_1x1 and not self.out_4d):  # 1x1: NHWC and NCHW orders agree
            x = x.permute(0, 2, 3, 1)
        y = x.reshape(x.shape[0], *self.rest)
        return y.permute(*_NHWC_TO_NCHW) if self.out_4d else y

    def extra_repr(self) -> str:
        return f"rest={self.rest}, in_4d={self.in_4d}, out_4d={self.out_4d}"


class L2Normalize(nn.Module):
    """TFLite L2_NORMALIZATION along the channel axis: x / max(sqrt(sum x^2), 1e-6)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.sqrt(torch.sum(x * x, dim=self.dim, keepdim=True))
        return x / torch.clamp(norm, min=1e-6)



@dataclass
class _Op:
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]
    options: object  # flatbuffers Table or None


def load_tflite(path: str | Path, *, channels_last: bool = True) -> nn.Module:
    """Compile the float32 TFLite file at `path` (one subgraph, one input, one output) into an `nn.Module`."""
    if not Path(path).is_file():
        raise TfliteConversionError(f"{path}: no such file")
    data = Path(path).read_bytes()
    if not tflite.Model.ModelBufferHasIdentifier(data, 0):
        raise TfliteConversionError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier)")
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() != 1:
        raise TfliteConversionError("only TFLite files with one subgraph are supported")
    module = _Builder(model, data).build()
    module.eval().requires_grad_(False)
    if channels_last:
        to_channels_last(module)
    return module



class _Builder:
    """Walks the operators in order and emits fx nodes; `self.env` maps TFLite tensor indices to fx nodes."""

    def __init__(self, model: tflite.Model, data: bytes) -> None:
        self.model, self.data = model, data
        self.sg = model.Subgraphs(0)
        self.ops = [self._read_op(i) for i in range(self.sg.OperatorsLength())]
        self.producer = {t: op for op in self.ops for t in op.outputs}
        self.n_uses: dict[int, int] = {}
        for op in self.ops:
            for t in op.inputs:
                self.n_uses[t] = self.n_uses.get(t, 0) + 1
        self.graph_outputs = set(self.sg.OutputsAsNumpy().tolist())
        self.consts: dict[int, np.ndarray] = {}
        self.graph = fx.Graph()
        self.root: dict[str, nn.Module | torch.Tensor] = {}
        self.env: dict[int, fx.Node] = {}
        self.buffers: dict[tuple[int, int], fx.Node] = {}  # (tensor, rank it broadcasts against) -> get_attr
        self.batch = 1

    def _read_op(self, i: int) -> _Op:
        op = self.sg.Operators(i)
        code = self.model.OperatorCodes(op.OpcodeIndex())
        name = _OP_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        return _Op(i, name, op.InputsAsNumpy().tolist(), op.OutputsAsNumpy().tolist(), op.BuiltinOptions())

    def build(self) -> fx.GraphModule:
        if self.sg.InputsLength() != 1 or self.sg.OutputsLength() != 1:
            raise TfliteConversionError("only TFLite graphs with one input and one output are supported")
        x_index, y_index = self.sg.Inputs(0), self.sg.Outputs(0)
        if self.sg.Tensors(x_index).Type() != tflite.TensorType.FLOAT32:
            raise TfliteConversionError("only float32 TFLite models are supported (this one is quantised)")
        self.batch = self.shape(x_index)[0]
        self.env[x_index] = self.graph.placeholder("x")
        fused, skipped = _find_prelu_patterns(self)
        for op in self.ops:
            if op.index in fused:
                self._emit_prelu(*fused[op.index])
            elif op.index not in skipped:
                self._emit(op)
        out = self._value(y_index)
        if len(self.shape(y_index)) == 4:
            out = self.graph.call_method("permute", (out, 0, 2, 3, 1))
        self.graph.output(out)
        return fx.GraphModule(self.root, self.graph, class_name="TfliteGraph")

    # ---------------------------------------------------------------- tensors
    def shape(self, t: int) -> list[int]:
        tensor = self.sg.Tensors(t)
        return tensor.ShapeAsNumpy().tolist() if tensor.ShapeLength() else []

    def const(self, t: int) -> np.ndarray | None:
        """The constant value of tensor `t` (from its buffer), or None when it is computed at run time."""
        if t in self.consts:
            return self.consts[t]
        tensor = self.sg.Tensors(t)
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer.Offset() > 1:
            raw = np.frombuffer(self.data, np.uint8, buffer.Size(), buffer.Offset())
        elif buffer.DataLength():
            raw = buffer.DataAsNumpy()
        else:
            return None
        if tensor.Type() not in _DTYPES:
            name = tensor.Name().decode()
            raise TfliteConversionError(f"tensor {name}: type {tensor.Type()} is not supported")
        self.consts[t] = raw.view(_DTYPES[tensor.Type()]).reshape(self.shape(t)).copy()
        return self.consts[t]

    def need_const(self, t: int) -> np.ndarray:
        value = self.const(t)
        if value is None:
            raise TfliteConversionError(f"tensor {self.sg.Tensors(t).Name().decode()} must be a constant")
        return value

    def _value(self, t: int, like_rank: int = 0) -> fx.Node:
        """The fx node for tensor `t`; a constant becomes a buffer laid out to broadcast with NCHW tensors."""
        if t in self.env:
            return self.env[t]
        if (t, like_rank) not in self.buffers:
            value = self.need_const(t).astype(np.float32)
            if like_rank == 4 and value.ndim >= 1:
                value = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(_NHWC_TO_NCHW)
            key = f"const_{len(self.root)}"
            self.root[key] = torch.tensor(value)
            self.buffers[(t, like_rank)] = self.graph.get_attr(key)
        return self.buffers[(t, like_rank)]

    def module(self, stem: str, module: nn.Module, *args: fx.Node) -> fx.Node:
        name = f"{stem}_{len(self.root)}"
        self.root[name] = module
        return self.graph.call_module(name, args)

    # ---------------------------------------------------------------- ops
    def _emit(self, op: _Op) -> None:
        handler = _HANDLERS.get(op.name)
        if handler is None:
            raise TfliteConversionError(f"TFLite op {op.name} (operator {op.index}) is not supported")
        result = handler(self, op)
        if result is not None:
            self.env[op.outputs[0]] = result

    def activation(self, node: fx.Node, code: int) -> fx.Node:
        make = _ACTIVATIONS.get(code)
        if make is None:
            raise TfliteConversionError(f"fused activation {code} is not supported")
        return node if code == tflite.ActivationFunctionType.NONE else self.module("act", make(), node)

    def _emit_prelu(self, x: int, slope: np.ndarray, out: int) -> None:
        self.env[out] = self.module("prelu", PReLU(f32(2.0 * slope.astype(np.float32))), self._value(x))


def _options(op: _Op, cls: type) -> Any:
    if op.options is None:
        return None
    opts = cls()
    opts.Init(op.options.Bytes, op.options.Pos)
    return opts


def _fused(op: _Op, cls: type) -> int:
    opts = _options(op, cls)
    return opts.FusedActivationFunction() if opts is not None else tflite.ActivationFunctionType.NONE


# -------------------------------------------------------------------- PReLU idiom
def _find_prelu_patterns(b: _Builder) -> tuple[dict[int, tuple[int, np.ndarray, int]], set[int]]:
    """ADD(RELU(x), MUL(m, SUB(x, ABS(x)))) with private intermediates.

    Returns ({ADD op index: (x, m, ADD output)}, indices of the RELU/ABS/SUB/MUL ops not to be emitted).
    """
    fused: dict[int, tuple[int, np.ndarray, int]] = {}
    skipped: set[int] = set()
    for op in b.ops:
        match = _match_prelu(b, op)
        if match is not None:
            fused[op.index] = match[0]
            skipped.update(match[1])
    return fused, skipped


def _match_prelu(b: _Builder, add: _Op) -> tuple[tuple[int, np.ndarray, int], list[int]] | None:
    if add.name != "ADD" or len(add.inputs) != 2 or _fused(add, tflite.AddOptions) != 0:
        return None
    ops = [b.producer.get(t) for t in add.inputs]
    relu, mul = (ops[0], ops[1]) if ops[0] is not None and ops[0].name == "RELU" else (ops[1], ops[0])
    if relu is None or mul is None or relu.name != "RELU" or mul.name != "MUL":
        return None
    if _fused(mul, tflite.MulOptions):
        return None
    consts = [b.const(t) for t in mul.inputs]
    if sum(c is not None for c in consts) != 1:
        return None
    slope, s_tensor = (consts[0], mul.inputs[1]) if consts[0] is not None else (consts[1], mul.inputs[0])
    sub = b.producer.get(s_tensor)
    x = relu.inputs[0]
    if sub is None or sub.name != "SUB" or _fused(sub, tflite.SubOptions) or sub.inputs[0] != x:
        return None
    absolute = b.producer.get(sub.inputs[1])
    if absolute is None or absolute.name != "ABS" or absolute.inputs[0] != x:
        return None
    private = (relu.outputs[0], mul.outputs[0], sub.outputs[0], absolute.outputs[0])
    if any(b.n_uses.get(t, 0) != 1 or t in b.graph_outputs for t in private):
        return None
    channels = b.shape(x)[-1] if b.shape(x) else 1
    if slope.size not in (1, channels) or (slope.size > 1 and slope.shape[-1] != channels):
        return None
    return (x, slope, add.outputs[0]), [relu.index, mul.index, sub.index, absolute.index]


# -------------------------------------------------------------------- op handlers
def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _conv_module(b: _Builder, op: _Op, weight: np.ndarray, groups: int, opts: Any) -> fx.Node:
    """weight is OIHW float32; opts has Padding/Stride/Dilation; emits the padded conv + fused activation."""
    _, height, width, _ = b.shape(op.inputs[0])
    kh, kw = weight.shape[2:]
    stride, dilation = (opts.StrideH(), opts.StrideW()), (opts.DilationHFactor(), opts.DilationWFactor())
    pads = [(0, 0), (0, 0)]
    if opts.Padding() == tflite.Padding.SAME:
        pads = [_same_pads(height, kh, stride[0], dilation[0]), _same_pads(width, kw, stride[1], dilation[1])]
    symmetric = pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], (kh, kw), stride=stride, dilation=dilation,
                     groups=groups, padding=(pads[0][0], pads[1][0]) if symmetric else 0)
    conv.weight.data = f32(weight)
    has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
    bias = b.need_const(op.inputs[2]) if has_bias else np.zeros(weight.shape[0])
    conv.bias.data = f32(bias)
    x = b._value(op.inputs[0])
    if not symmetric:
        x = b.module("pad", nn.ZeroPad2d((pads[1][0], pads[1][1], pads[0][0], pads[0][1])), x)
    return b.activation(b.module("conv", conv, x), opts.FusedActivationFunction())


def _conv2d(b: _Builder, op: _Op) -> fx.Node:
    weight = b.need_const(op.inputs[1]).transpose(0, 3, 1, 2)  # OHWI -> OIHW
    groups = b.shape(op.inputs[0])[3] // weight.shape[1]
    return _conv_module(b, op, weight, groups, _options(op, tflite.Conv2DOptions))


def _depthwise(b: _Builder, op: _Op) -> fx.Node:
    weight = b.need_const(op.inputs[1])  # 1HW(C*M) -> (C*M)1HW, output channel c*M + m as in torch groups
    channels = b.shape(op.inputs[0])[3]
    return _conv_module(b, op, weight.transpose(3, 0, 1, 2), channels,
                        _options(op, tflite.DepthwiseConv2DOptions))


def _fully_connected(b: _Builder, op: _Op) -> fx.Node:
    opts = _options(op, tflite.FullyConnectedOptions)
    weight = b.need_const(op.inputs[1]).astype(np.float32)
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data = f32(weight)
    has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
    bias = b.need_const(op.inputs[2]) if has_bias else np.zeros(weight.shape[0])
    linear.bias.data = f32(bias)
    x = b._value(op.inputs[0])
    if len(b.shape(op.inputs[0])) != 2:
        if opts is not None and opts.KeepNumDims():
            raise TfliteConversionError("FULLY_CONNECTED with keep_num_dims is not supported")
        in_4d = len(b.shape(op.inputs[0])) == 4
        x = b.module("reshape", NhwcReshape((weight.shape[1],), in_4d, False), x)
    act = opts.FusedActivationFunction() if opts is not None else 0
    return b.activation(b.module("linear", linear, x), act)


def _reshape(b: _Builder, op: _Op) -> fx.Node:
    shape = [int(d) for d in b.shape(op.outputs[0])]
    target = b.const(op.inputs[1]) if len(op.inputs) > 1 else None
    if target is not None:
        shape = [int(d) for d in target.reshape(-1)]
    if not shape or shape[0] not in (b.batch, -1) or (shape[0] == -1 and -1 in shape[1:]):
        raise TfliteConversionError(f"RESHAPE to {shape} does not keep the batch dimension")
    module = NhwcReshape(tuple(shape[1:]), len(b.shape(op.inputs[0])) == 4, len(shape) == 4)
    return b.module("reshape", module, b._value(op.inputs[0]))


def _binary(fn: Callable, options: type) -> Callable[[_Builder, _Op], fx.Node]:
    def handler(b: _Builder, op: _Op) -> fx.Node:
        rank = max(len(b.shape(t)) for t in op.inputs)
        dynamic_ranks = {len(b.shape(t)) for t in op.inputs if b.const(t) is None}
        if len(dynamic_ranks) > 1:
            raise TfliteConversionError(f"{op.name} between computed tensors of different ranks")
        args = tuple(b._value(t, rank) for t in op.inputs)
        return b.activation(b.graph.call_function(fn, args), _fused(op, options))

    return handler


def _unary(make: Callable[[], nn.Module], stem: str) -> Callable[[_Builder, _Op], fx.Node]:
    def handler(b: _Builder, op: _Op) -> fx.Node:
        return b.module(stem, make(), b._value(op.inputs[0]))

    return handler


def _abs(b: _Builder, op: _Op) -> fx.Node:
    return b.graph.call_function(torch.abs, (b._value(op.inputs[0]),))


def _prelu(b: _Builder, op: _Op) -> fx.Node:
    slope = b.need_const(op.inputs[1]).astype(np.float32)
    channels = b.shape(op.inputs[0])[-1]
    x = b._value(op.inputs[0])
    if slope.size in (1, channels) and slope.shape[-1:] in ((), (1,), (channels,)):
        return b.module("prelu", PReLU(f32(slope)), x)
    neg = b.graph.call_function(torch.mul, (x, b._value(op.inputs[1], len(b.shape(op.inputs[0])))))
    return b.graph.call_function(torch.where, (b.graph.call_function(operator.gt, (x, 0.0)), x, neg))


def _mean(b: _Builder, op: _Op) -> fx.Node:
    rank = len(b.shape(op.inputs[0]))
    axes = [int(a) % rank for a in b.need_const(op.inputs[1]).reshape(-1)]
    if rank == 4:
        axes = [_NHWC_TO_NCHW.index(a) for a in axes]
    opts = _options(op, tflite.ReducerOptions)
    keep = bool(opts.KeepDims()) if opts is not None else False
    if rank == 4 and not keep and sorted(axes) != [2, 3]:
        raise TfliteConversionError("MEAN of a 4-d tensor without keep_dims: spatial axes only")
    return b.graph.call_function(torch.mean, (b._value(op.inputs[0]),), {"dim": tuple(axes), "keepdim": keep})


def _l2_norm(b: _Builder, op: _Op) -> fx.Node:
    dim = 1 if len(b.shape(op.inputs[0])) == 4 else -1
    node = b.module("l2norm", L2Normalize(dim), b._value(op.inputs[0]))
    return b.activation(node, _fused(op, tflite.L2NormOptions))


def _pad(b: _Builder, op: _Op) -> fx.Node:
    pads = b.need_const(op.inputs[1]).astype(int)
    if len(pads) != 4 or pads[0].any() or pads[3].any():
        raise TfliteConversionError("PAD is supported on the spatial axes of 4-d tensors only")
    module = nn.ZeroPad2d((int(pads[2][0]), int(pads[2][1]), int(pads[1][0]), int(pads[1][1])))
    return b.module("pad", module, b._value(op.inputs[0]))


def _dequantize(b: _Builder, op: _Op) -> None:
    b.consts[op.outputs[0]] = b.need_const(op.inputs[0]).astype(np.float32)


_ACTIVATIONS: dict[int, Callable[[], nn.Module]] = {
    tflite.ActivationFunctionType.NONE: nn.Identity,
    tflite.ActivationFunctionType.RELU: nn.ReLU,
    tflite.ActivationFunctionType.RELU6: nn.ReLU6,
    tflite.ActivationFunctionType.RELU_N1_TO_1: lambda: nn.Hardtanh(-1.0, 1.0),
    tflite.ActivationFunctionType.TANH: nn.Tanh,
}

_HANDLERS: dict[str, Callable[[_Builder, _Op], fx.Node | None]] = {
    "CONV_2D": _conv2d,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "RESHAPE": _reshape,
    "ADD": _binary(torch.add, tflite.AddOptions),
    "SUB": _binary(torch.sub, tflite.SubOptions),
    "MUL": _binary(torch.mul, tflite.MulOptions),
    "DIV": _binary(torch.div, tflite.DivOptions),
    "RELU": _unary(nn.ReLU, "relu"),
    "RELU6": _unary(nn.ReLU6, "relu6"),
    "TANH": _unary(nn.Tanh, "tanh"),
    "LOGISTIC": _unary(nn.Sigmoid, "sigmoid"),
    "ABS": _abs,
    "PRELU": _prelu,
    "MEAN": _mean,
    "L2_NORMALIZATION": _l2_norm,
    "PAD": _pad,
    "DEQUANTIZE": _dequantize,
}
