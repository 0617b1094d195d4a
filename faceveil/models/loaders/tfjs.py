"""TF.js graph models (model.json + .bin shards) compiled into a PyTorch module.

The graph is not interpreted node by node: it is compiled, once, into a short list of real layers (conv,
linear, pooling, elementwise), after folding what TF.js computes separately but exactly the same way up to
float32 rounding:

- a constant per-channel Mul / Add / Sub / RealDiv / BiasAdd (batch-norm) after a conv or matmul goes into
  its weights and bias (computed in float64);
- a zero spatial Pad before a VALID conv becomes the conv's padding; TF 'SAME' padding is resolved per input
  size into explicit (possibly asymmetric) padding;
- Relu / Relu6 / Minimum / Maximum with a scalar become one clamp fused on the producing layer (in place on a
  fresh conv result), and Maximum(0, x) + g * Minimum(0, x) becomes PReLU.

Layout: TF.js is NHWC; the module is fed NCHW and keeps every rank-4 tensor NCHW (logical NHWC axes are
mapped to physical NCHW axes for Mean, Pad, Concat, Softmax, Reshape ...), by default in channels-last
memory format (fast depthwise convs). A rank-4 graph output is returned NHWC, as TF.js returns it.
Parameters are frozen (requires_grad False): gradients flow to the input only, which is what attacks need;
`.double()` gives a float64 copy for gradient checks.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceveil.errors import FaceveilError
from faceveil.models.prelu import prelu

INF = math.inf
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


class TfjsGraphError(FaceveilError):
    """A model.json this loader cannot read or compile (unsupported op, bad manifest, missing node)."""


# ----------------------------------------------------------------------------------------------- weights


_BYTES = {"float32": 4, "int32": 4, "bool": 1, "uint8": 1, "uint16": 2, "float16": 2}
_NP_DTYPE = {"float32": "<f4", "int32": "<i4", "bool": "u1", "uint8": "u1", "uint16": "<u2", "float16": "<f2"}


def _decode_weight(buf: bytes, offset: int, spec: dict) -> tuple[np.ndarray, int]:
    """One manifest entry at `offset` -> (dequantised array, bytes used)."""
    shape = [int(d) for d in spec.get("shape", [])]
    count = math.prod(shape)
    quant = spec.get("quantization")
    stored = quant["dtype"] if quant else spec["dtype"]
    if stored not in _BYTES:
        raise TfjsGraphError(f"weight {spec['name']}: unsupported dtype {stored}")
    raw = np.frombuffer(buf, dtype=_NP_DTYPE[stored], count=count, offset=offset)
    if stored in ("uint8", "uint16"):
        values = raw.astype(np.float64) * float(quant["scale"]) + float(quant["min"])
        values = np.rint(values) if spec["dtype"] == "int32" else values
        arr = values.astype(np.int32 if spec["dtype"] == "int32" else np.float32)
    elif stored == "float16":
        arr = raw.astype(np.float32)
    else:
        arr = raw.copy()
    return arr.reshape(shape), count * _BYTES[stored]


def load_weights(json_path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read model.json and its shards: (the json, weight name -> dequantised numpy array)."""
    json_path = Path(json_path)
    spec = json.loads(json_path.read_text())
    out: dict[str, np.ndarray] = {}
    for group in spec.get("weightsManifest", []):
        buf = b"".join((json_path.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            out[w["name"]], used = _decode_weight(buf, offset, w)
            offset += used
        if offset != len(buf):
            raise TfjsGraphError(f"{json_path}: manifest describes {offset} bytes, shards hold {len(buf)}")
    return spec, out


# ----------------------------------------------------------------------------------------------- graph


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]
    attr: dict = field(default_factory=dict)

    def ints(self, key: str) -> list[int]:
        return [int(i) for i in self.attr.get(key, {}).get("list", {}).get("i", [])]

    def string(self, key: str, default: str = "") -> str:
        s = self.attr.get(key, {}).get("s")
        return base64.b64decode(s).decode() if s else default

    def strings(self, key: str) -> list[str]:
        return [base64.b64decode(s).decode() for s in self.attr.get(key, {}).get("list", {}).get("s", [])]

    def flag(self, key: str) -> bool:
        return bool(self.attr.get(key, {}).get("b", False))

    def number(self, key: str, default: float) -> float:
        return float(self.attr.get(key, {}).get("f", default))


def _clean(name: str) -> str:
    """'node:0' -> 'node'; other output indices are kept (and rejected later)."""
    return name[:-2] if name.endswith(":0") else name


def _parse_nodes(topology: dict) -> dict[str, _Node]:
    nodes = {}
    for n in topology["node"]:
        inputs = [_clean(i) for i in n.get("input", []) if not i.startswith("^")]
        nodes[n["name"]] = _Node(n["name"], n["op"], inputs, n.get("attr", {}))
    return nodes


_PASS_THROUGH = {"Identity", "StopGradient", "Snapshot", "PreventGradient"}


def _is_pass_through(node: _Node) -> bool:
    dst = node.attr.get("DstT", {}).get("type", "DT_FLOAT")
    return node.op in _PASS_THROUGH or (node.op == "Cast" and dst == "DT_FLOAT")


def _resolve(nodes: dict[str, _Node], name: str) -> str:
    """Follow Identity-like nodes back to the tensor they forward."""
    while name in nodes and _is_pass_through(nodes[name]):
        name = nodes[name].inputs[0]
    return name


def _scalar(consts: dict[str, np.ndarray], name: str) -> float | None:
    arr = consts.get(name)
    return float(arr) if arr is not None and arr.size == 1 else None


def _prelu_match(nodes: dict[str, _Node], consts: dict, a: str, b: str) -> tuple[str, str] | None:
    """a = Maximum(0, x), b = Mul(g, Minimum(0, x)) -> (x, g)."""
    na, nb = nodes.get(a), nodes.get(b)
    if not na or not nb or na.op != "Maximum" or nb.op != "Mul":
        return None
    x = [i for i in na.inputs if _scalar(consts, i) != 0.0]
    g = [i for i in nb.inputs if i in consts]
    m = [i for i in nb.inputs if i in nodes and nodes[i].op == "Minimum"]
    if len(x) != 1 or len(g) != 1 or len(m) != 1 or len(na.inputs) != 2:
        return None
    mins = nodes[m[0]].inputs
    if len(mins) != 2 or x[0] not in mins or not any(_scalar(consts, i) == 0.0 for i in mins):
        return None
    return x[0], g[0]


def _rewrite(nodes: dict[str, _Node], consts: dict) -> None:
    """Graph-level rewrites before compiling: skip Identity-like nodes, recognise PReLU."""
    for node in nodes.values():
        node.inputs = [_resolve(nodes, i) for i in node.inputs]
    for node in nodes.values():
        if node.op in ("Add", "AddV2") and len(node.inputs) == 2:
            a, b = node.inputs
            match = _prelu_match(nodes, consts, a, b) or _prelu_match(nodes, consts, b, a)
            if match:
                node.op, node.inputs = "Prelu", list(match)


def topological_order(outputs: Sequence[str], inputs_of: Callable[[str], Iterable[str]], known: Container[str],
                      error: type[Exception] = TfjsGraphError) -> list[str]:
    """The nodes `outputs` depend on, inputs before consumers (iterative depth-first: these graphs are deep);
    inputs_of(name) gives a node's data inputs, `known` the graph's node names."""
    order, done, stack = [], set(), [(o, False) for o in reversed(outputs)]
    while stack:
        name, expanded = stack.pop()
        if name in done:
            continue
        if name not in known:
            raise error(f"graph has no node {name!r}")
        if expanded:
            done.add(name)
            order.append(name)
            continue
        stack.append((name, True))
        stack.extend((i, False) for i in reversed(list(inputs_of(name))) if i not in done)
    return order


def _topo_order(nodes: dict[str, _Node], outputs: Sequence[str]) -> list[str]:
    """Nodes needed for `outputs`, inputs before consumers."""
    return topological_order(outputs, lambda name: nodes[name].inputs, nodes)


# ----------------------------------------------------------------------------------------------- layers


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, np.float32))


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME': output ceil(size / stride), the extra padding goes after."""
    eff = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


class _Step(nn.Module):
    """One compiled layer; `act` (clamp / prelu / ...) is applied to its result."""

    def __init__(self) -> None:
        super().__init__()
        self.act: nn.Module | None = None

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        y = self.run(*xs)
        return y if self.act is None else self.act(y)

    def set_act(self, act: nn.Module) -> None:
        """Fuse an activation; clamps run in place on results this step creates afresh (conv, elementwise)."""
        if isinstance(act, _Clamp):
            act.inplace = isinstance(self, _Conv | _Binary)
        self.act = act

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _ClampInPlace(torch.autograd.Function):
    """clamp_ whose backward needs only its result (torch's own hardtanh_ saves a copy of the input)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        x.clamp_(lo, hi)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (y,) = ctx.saved_tensors
        # lo < y < hi exactly where lo < x < hi: the mask of hardtanh's gradient
        return torch.ops.aten.hardtanh_backward(grad, y, *ctx.bounds), None, None


class _Clamp(nn.Module):
    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi
        self.inplace = False  # set when applied to a fresh result (conv, elementwise) that nothing else holds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = (None if self.lo == -INF else self.lo), (None if self.hi == INF else self.hi)
        if lo == 0.0 and hi is None:
            return F.relu(x, inplace=self.inplace)
        if not self.inplace:
            return torch.clamp(x, lo, hi)
        if x.requires_grad:
            return _ClampInPlace.apply(x, self.lo, self.hi)
        return x.clamp_(lo, hi)

    def extra_repr(self) -> str:
        return f"{self.lo}, {self.hi}"


class _PRelu(nn.Module):
    """max(0, x) + alpha * min(0, x); alpha per channel (physical dim 1) or broadcast."""

    def __init__(self, alpha: torch.Tensor, per_channel: bool) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.alpha = nn.Parameter(alpha, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return prelu(x, self.alpha)
        return torch.where(x > 0, x, x * self.alpha)


class _Fn(nn.Module):
    """A parameter-free elementwise activation."""

    def __init__(self, name: str, alpha: float = 0.0) -> None:
        super().__init__()
        self.name, self.alpha = name, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UNARY[self.name](x, self.alpha)

    def extra_repr(self) -> str:
        return self.name


_UNARY: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "Sigmoid": lambda x, a: torch.sigmoid(x),
    "Tanh": lambda x, a: torch.tanh(x),
    "Elu": lambda x, a: F.elu(x),
    "Selu": lambda x, a: F.selu(x),
    "LeakyRelu": lambda x, a: F.leaky_relu(x, a),
    "Exp": lambda x, a: torch.exp(x),
    "Log": lambda x, a: torch.log(x),
    "Neg": lambda x, a: -x,
    "Abs": lambda x, a: torch.abs(x),
    "Sqrt": lambda x, a: torch.sqrt(x),
    "Rsqrt": lambda x, a: torch.rsqrt(x),
    "Square": lambda x, a: x * x,
    "Reciprocal": lambda x, a: 1.0 / x,
    "Softplus": lambda x, a: F.softplus(x),
}


class _Activate(_Step):
    """A step that only applies its act (a clamp / activation that could not be fused)."""

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Conv(_Step):
    """Conv2d (groups = channels for depthwise) with TF padding: 'SAME', 'VALID' or explicit (t, b, l, r)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
                 dilation: tuple[int, int], groups: int, padding: str | tuple[int, int, int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(_tensor(weight), requires_grad=False)
        b = np.zeros(weight.shape[0]) if bias is None else bias
        self.bias = nn.Parameter(_tensor(b), requires_grad=False)
        self.stride, self.dilation, self.groups, self.padding = stride, dilation, groups, padding
        self._pads: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        if isinstance(self.padding, tuple):
            return self.padding
        if (h, w) not in self._pads:
            kh, kw = self.weight.shape[2:]
            if self.padding == "SAME":
                top, bottom = _same_pads(h, kh, self.stride[0], self.dilation[0])
                left, right = _same_pads(w, kw, self.stride[1], self.dilation[1])
                self._pads[h, w] = (top, bottom, left, right)
            else:
                self._pads[h, w] = (0, 0, 0, 0)
        return self._pads[h, w]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pads(x.shape[-2], x.shape[-1])
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        if self.groups == 1 or self.dilation != (1, 1):
            x = F.pad(x, (left, right, top, bottom))
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        # Depthwise convs are memory-bound: rather than copying the input into a padded one, pad symmetrically
        # by the larger amount and give the kernel zero rows / columns on the side padded less (those taps
        # multiply exact zeros). Measured 1.3-2.8x faster than F.pad for the stride-2 depthwise layers.
        zeros = (max(right - left, 0), max(left - right, 0), max(bottom - top, 0), max(top - bottom, 0))
        weight = F.pad(self.weight, zeros)
        pad = (max(top, bottom), max(left, right))
        return F.conv2d(x, weight, self.bias, self.stride, pad, self.dilation, self.groups)

    def fold(self, scale: np.ndarray | None, shift: np.ndarray | None) -> None:
        """y -> y * scale + shift, per output channel, folded into weight and bias (computed in float64)."""
        w, b = self.weight.double().numpy(), self.bias.double().numpy()
        if scale is not None:
            w, b = w * scale.reshape(-1, *[1] * (w.ndim - 1)), b * scale
        if shift is not None:
            b = b + shift
        self.weight.data, self.bias.data = _tensor(w), _tensor(b)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape)
        return f"weight={shape}, stride={self.stride}, groups={self.groups}, pad={self.padding}"


class _Linear(_Conv):
    """MatMul with a constant right operand (+ bias); folding as for convs."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        super().__init__(weight, bias, (1, 1), (1, 1), 1, "VALID")

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}"


def _to_physical(x: torch.Tensor) -> torch.Tensor:
    """Lower-rank NHWC-broadcastable tensor -> rank 4 broadcastable against NCHW."""
    x = x.reshape(*[1] * (4 - x.dim()), *x.shape)
    return x.permute(*_NHWC_TO_NCHW)


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add, "AddV2": torch.add, "BiasAdd": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "RealDiv": torch.div, "Div": torch.div, "Maximum": torch.maximum, "Minimum": torch.minimum,
    "SquaredDifference": lambda a, b: (a - b) * (a - b), "Pow": torch.pow,
}


class _Binary(_Step):
    """Elementwise op on two tensors, or on one tensor and a constant (stored already in physical layout)."""

    def __init__(self, op: str, const: np.ndarray | None, const_first: bool, align: tuple[bool, ...]) -> None:
        super().__init__()
        self.op, self.const_first, self.align = op, const_first, align
        c = None if const is None else _tensor(const)
        self.register_buffer("const", c)

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        args = [_to_physical(x) if a else x for x, a in zip(xs, self.align, strict=False)]
        if self.const is not None:
            args = [self.const, args[0]] if self.const_first else [args[0], self.const]
        return _BINARY[self.op](args[0], args[1])

    def extra_repr(self) -> str:
        return self.op if self.const is None else f"{self.op}, const={tuple(self.const.shape)}"


class _Pool(_Step):
    def __init__(self, kind: str, ksize: tuple[int, int], stride: tuple[int, int], padding: str) -> None:
        super().__init__()
        self.kind, self.ksize, self.stride, self.padding = kind, ksize, stride, padding

    def run(self, x: torch.Tensor) -> torch.Tensor:
        top = bottom = left = right = 0
        if self.padding == "SAME":
            top, bottom = _same_pads(x.shape[-2], self.ksize[0], self.stride[0], 1)
            left, right = _same_pads(x.shape[-1], self.ksize[1], self.stride[1], 1)
        if self.kind == "MaxPool":
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom), value=-INF)
            return F.max_pool2d(x, self.ksize, self.stride)
        if not (top or bottom or left or right):
            return F.avg_pool2d(x, self.ksize, self.stride)
        ones = torch.ones_like(x[:1, :1])
        pads = (left, right, top, bottom)
        total = F.avg_pool2d(F.pad(x, pads), self.ksize, self.stride, divisor_override=1)
        return total / F.avg_pool2d(F.pad(ones, pads), self.ksize, self.stride, divisor_override=1)


class _Reduce(_Step):
    """Mean / Sum / Max / Min / Prod over physical dims, then a permute back to logical order if needed."""

    def __init__(self, kind: str, dims: list[int], keep: bool, perm: list[int] | None) -> None:
        super().__init__()
        self.kind, self.dims, self.keep, self.perm = kind, dims, keep, perm

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "Mean":
            y = x.mean(self.dims, keepdim=self.keep)
        elif self.kind == "Sum":
            y = x.sum(self.dims, keepdim=self.keep)
        else:
            fn = {"Max": torch.amax, "Min": torch.amin}[self.kind]
            y = fn(x, self.dims, keepdim=self.keep)
        return y if self.perm is None else y.permute(*self.perm)


class _Reshape(_Step):
    """Reshape with TF (logical NHWC) element order; a leading 1 / -1 in the target follows the batch size."""

    def __init__(self, target: list[int], in_rank: int) -> None:
        super().__init__()
        self.target, self.in_rank = target, in_rank

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_rank == 4:
            x = x.permute(*_NCHW_TO_NHWC)
        target = list(self.target)
        if target and target[0] in (1, -1) and -1 not in target[1:]:
            target[0] = -1
        elif target and target[0] == 1:
            target[0] = x.shape[0]
        y = x.reshape(target)
        return y.permute(*_NHWC_TO_NCHW) if y.dim() == 4 else y


class _Pad(_Step):
    """Pad / MirrorPad; `pads` per physical dim as (before, after)."""

    def __init__(self, pads: list[tuple[int, int]], mode: str, value: float) -> None:
        super().__init__()
        self.pads, self.mode, self.value = pads, mode, value

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "CONSTANT":
            flat = [p for before, after in reversed(self.pads) for p in (before, after)]
            return F.pad(x, flat, value=self.value)
        off = 1 if self.mode == "REFLECT" else 0
        for d, (a, b) in enumerate(self.pads):
            n = x.shape[d]
            parts = [x.narrow(d, off, a).flip(d)] if a else []
            parts.append(x)
            parts += [x.narrow(d, n - off - b, b).flip(d)] if b else []
            x = torch.cat(parts, d) if len(parts) > 1 else x
        return x


class _Concat(_Step):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.dim)


class _Softmax(_Step):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, self.dim)


class _MatMul(_Step):
    """MatMul of two computed tensors."""

    def __init__(self, ta: bool, tb: bool) -> None:
        super().__init__()
        self.ta, self.tb = ta, tb

    def run(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.mT if self.ta else a) @ (b.mT if self.tb else b)


class _Squeeze(_Step):
    def __init__(self, dims: list[int], perm: list[int] | None) -> None:
        super().__init__()
        self.dims, self.perm = dims, perm

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = x.squeeze(self.dims)
        return y if self.perm is None else y.permute(*self.perm)


# ----------------------------------------------------------------------------------------------- module


class TfjsGraph(nn.Module):
    """The compiled graph: steps run in order, each reading and writing numbered slots (0 is the input)."""

    def __init__(self, steps: list[_Step], wiring: list[tuple[tuple[int, ...], int]], outputs: list[int],
                 output_nhwc: list[bool], free: list[tuple[int, ...]], channels_last: bool) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.wiring, self.outputs, self.output_nhwc, self.free = wiring, outputs, output_nhwc, free
        self.channels_last = channels_last
        self.n_slots = 1 + max([dst for _, dst in wiring] + [0])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        slots: list[torch.Tensor | None] = [None] * self.n_slots
        slots[0] = x
        for step, (srcs, dst), free in zip(self.steps, self.wiring, self.free, strict=True):
            slots[dst] = step(*[slots[s] for s in srcs])
            for s in free:
                slots[s] = None
        outs = [slots[o].permute(*_NCHW_TO_NHWC) if nhwc else slots[o]
                for o, nhwc in zip(self.outputs, self.output_nhwc, strict=True)]
        return outs[0] if len(outs) == 1 else tuple(outs)


# ----------------------------------------------------------------------------------------------- compiler


@dataclass
class _Val:
    """A graph tensor at compile time: constant (numpy, logical layout) or computed (slot, rank, producer)."""

    rank: int
    const: np.ndarray | None = None
    slot: int = -1
    step: int | None = None


def _phys_axis(axis: int, rank: int) -> int:
    axis = axis + rank if axis < 0 else axis
    return _NHWC_TO_NCHW.index(axis) if rank == 4 else axis


def _phys_const(arr: np.ndarray, other_rank: int) -> np.ndarray:
    """A constant broadcast against a rank-4 NHWC tensor -> rank 4 NCHW-broadcastable."""
    if other_rank != 4 or arr.ndim > 4:
        return arr
    arr = arr.reshape(*[1] * (4 - arr.ndim), *arr.shape)
    return arr.transpose(*_NHWC_TO_NCHW)


def _channel_vector(arr: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """A constant that broadcasts per output channel (last logical axis) -> [channels] float64, else None."""
    if arr.ndim > rank or (arr.ndim and any(d != 1 for d in arr.shape[:-1])):
        return None
    if arr.size not in (1, channels):
        return None
    return np.broadcast_to(arr.astype(np.float64).reshape(-1), (channels,)).copy()


def _drop_dims(dims: list[int], rank: int) -> tuple[list[int], list[int] | None]:
    """Logical axes removed from a tensor -> (physical dims, permute restoring logical order of the rest)."""
    axes = sorted({d + rank if d < 0 else d for d in dims})
    phys = sorted(_phys_axis(a, rank) for a in axes)
    rest = [_phys_axis(a, rank) for a in range(rank) if a not in axes]
    perm = [sorted(rest).index(p) for p in rest]
    return phys, (None if perm == sorted(perm) else perm)


class _Compiler:
    """Walks the needed nodes in order and emits steps, fusing into the producing step where that is exact."""

    def __init__(self, nodes: dict[str, _Node], consts: dict[str, np.ndarray], order: list[str],
                 outputs: list[str], fuse: bool) -> None:
        self.nodes, self.consts, self.fuse = nodes, consts, fuse
        self.uses = Counter(i for n in order for i in nodes[n].inputs) + Counter(outputs)
        self.vals: dict[str, _Val] = {}
        self.steps: list[_Step | None] = []
        self.wiring: list[tuple[list[int], int]] = []
        self.owner: list[str] = []

    def compile(self, order: list[str]) -> None:
        for name in order:
            node = self.nodes[name]
            handler = _HANDLERS.get(node.op)
            if handler is None:
                raise TfjsGraphError(f"unsupported TF.js op {node.op} (node {name!r})")
            handler(self, node)

    def slots(self, names: Sequence[str]) -> list[int]:
        for s in names:
            if self.vals[s].const is not None:
                raise TfjsGraphError(f"constant input {s!r} is not supported here")
        return [self.vals[s].slot for s in names]

    def emit(self, name: str, step: _Step, slots: list[int], rank: int) -> _Step:
        self.steps.append(step)
        self.wiring.append((slots, len(self.steps)))
        self.owner.append(name)
        self.vals[name] = _Val(rank, slot=len(self.steps), step=len(self.steps) - 1)
        return step

    def alias(self, name: str, src: str) -> None:
        """`name` is now computed by the step that computed `src` (after a fold / fusion into it)."""
        v = self.vals[src]
        self.vals[name] = _Val(v.rank, const=v.const, slot=v.slot, step=v.step)
        if v.step is not None and v.const is None:
            self.owner[v.step] = name

    def sole_producer(self, name: str) -> _Step | None:
        """The step computing `name` when fusing into it is safe: `name` is its latest result, used once."""
        v = self.vals[name]
        if not self.fuse or v.const is not None or v.step is None or self.uses[name] != 1:
            return None
        return self.steps[v.step] if self.owner[v.step] == name else None

    def const(self, name: str) -> np.ndarray | None:
        return self.vals[name].const

    def need_const(self, node: _Node, i: int) -> np.ndarray:
        arr = self.const(node.inputs[i])
        if arr is None:
            raise TfjsGraphError(f"{node.name}: input {i} must be a constant")
        return arr

    def activate(self, name: str, src: str, act: nn.Module) -> None:
        """Apply an elementwise activation: fused on the producing step when possible."""
        step = self.sole_producer(src)
        if step is not None and isinstance(act, _Clamp) and isinstance(step.act, _Clamp):
            lo, hi = max(step.act.lo, act.lo), min(step.act.hi, act.hi)
            if act.lo <= step.act.hi and act.hi >= step.act.lo:
                step.set_act(_Clamp(lo, hi))
                return self.alias(name, src)
        if step is not None and step.act is None:
            step.set_act(act)
            return self.alias(name, src)
        step = _Activate()
        step.set_act(act)
        self.emit(name, step, self.slots([src]), self.vals[src].rank)

    def affine(self, name: str, src: str, scale: np.ndarray | None, shift: np.ndarray | None) -> bool:
        """Fold y = x * scale + shift (per output channel) into the conv / linear computing x, if possible."""
        step = self.sole_producer(src)
        if not isinstance(step, _Conv) or step.act is not None:
            return False
        rank = self.vals[src].rank
        if (rank == 4) == isinstance(step, _Linear):
            return False
        n = step.weight.shape[0]
        vecs = [None if a is None else _channel_vector(a, rank, n) for a in (scale, shift)]
        if any(v is None and a is not None for v, a in zip(vecs, (scale, shift), strict=True)):
            return False
        step.fold(*vecs)
        self.alias(name, src)
        return True

    def program(self, outputs: list[str], channels_last: bool) -> TfjsGraph:
        """The steps that survived fusion, renumbered, with slots freed after their last use."""
        keep = [i for i, s in enumerate(self.steps) if s is not None]
        slot_map = {0: 0} | {self.wiring[i][1]: k + 1 for k, i in enumerate(keep)}
        wiring = [(tuple(slot_map[s] for s in self.wiring[i][0]), slot_map[self.wiring[i][1]]) for i in keep]
        outs = [slot_map[self.vals[o].slot] for o in outputs]
        last = {s: k for k, (srcs, _) in enumerate(wiring) for s in srcs}
        free = [tuple(s for s in set(srcs) if last[s] == k and s not in outs)
                for k, (srcs, _) in enumerate(wiring)]
        nhwc = [self.vals[o].rank == 4 for o in outputs]
        steps = [self.steps[i] for i in keep]
        return TfjsGraph(steps, wiring, outs, nhwc, free, channels_last)


# ----------------------------------------------------------------------------------------------- op handlers


def _h_const(c: _Compiler, node: _Node) -> None:
    if node.name not in c.consts:
        raise TfjsGraphError(f"constant {node.name!r} is not in the weights manifest")
    arr = c.consts[node.name]
    c.vals[node.name] = _Val(arr.ndim, const=arr)


def _h_placeholder(c: _Compiler, node: _Node) -> None:
    if any(v.slot == 0 for v in c.vals.values()):
        raise TfjsGraphError("graphs with more than one input are not supported")
    dims = node.attr.get("shape", {}).get("shape", {}).get("dim", [])
    c.vals[node.name] = _Val(len(dims) or 4, slot=0)


def _h_pass(c: _Compiler, node: _Node) -> None:
    c.alias(node.name, node.inputs[0])


def _h_cast(c: _Compiler, node: _Node) -> None:
    """Casts to float were skipped as pass-through; what is left is a cast of a constant, or unsupported."""
    k = c.const(node.inputs[0])
    if k is None:
        raise TfjsGraphError(f"{node.name}: casting a computed tensor to a non-float type is not supported")
    dst = node.attr.get("DstT", {}).get("type", "DT_FLOAT")
    arr = k.astype({"DT_INT32": np.int32, "DT_BOOL": np.bool_}.get(dst, np.float32))
    c.vals[node.name] = _Val(arr.ndim, const=arr)


def _conv_weight(c: _Compiler, node: _Node, depthwise: bool) -> tuple[np.ndarray, int]:
    """TF filter -> (torch OIHW weight, groups)."""
    w = c.need_const(node, 1)
    if depthwise:
        kh, kw, cin, mult = w.shape
        return w.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw), cin
    return w.transpose(3, 2, 0, 1), 1


def _absorb_pad(c: _Compiler, src: str, padding: str | tuple) -> tuple[int, str | tuple]:
    """A zero spatial Pad feeding a VALID conv becomes the conv's padding: (input slot, padding)."""
    step = c.sole_producer(src)
    if padding != "VALID" or not isinstance(step, _Pad) or step.mode != "CONSTANT" or step.value != 0.0:
        return c.slots([src])[0], padding
    (b0, b1), (c0, c1), (top, bottom), (left, right) = step.pads
    if step.act is not None or b0 or b1 or c0 or c1:
        return c.slots([src])[0], padding
    idx = c.vals[src].step
    c.steps[idx] = None
    return c.wiring[idx][0][0], (top, bottom, left, right)


def _h_conv(c: _Compiler, node: _Node) -> None:
    if node.string("data_format", "NHWC") != "NHWC":
        raise TfjsGraphError(f"{node.name}: only NHWC convolutions are supported")
    weight, groups = _conv_weight(c, node, "Depthwise" in node.op)
    strides, dil = node.ints("strides") or [1] * 4, node.ints("dilations") or [1] * 4
    padding: str | tuple = node.string("padding", "VALID")
    if padding == "EXPLICIT":
        p = node.ints("explicit_paddings")
        padding = (p[2], p[3], p[4], p[5])
    slot, padding = _absorb_pad(c, node.inputs[0], padding)
    step = _Conv(weight, None, (strides[1], strides[2]), (dil[1], dil[2]), groups, padding)
    c.emit(node.name, step, [slot], 4)
    _apply_fused(c, node, step)


def _fused_act(c: _Compiler, node: _Node, op: str, extra: list[str]) -> nn.Module:
    if op in ("relu", "relu6"):
        return _Clamp(0.0, INF if op == "relu" else 6.0)
    if op == "prelu":
        alpha = c.const(extra.pop(0))
        vec = _channel_vector(alpha, 4, alpha.size) if alpha is not None else None
        if vec is None:
            raise TfjsGraphError(f"{node.name}: fused prelu needs a per-channel constant alpha")
        return _PRelu(torch.from_numpy(vec.astype(np.float32)), per_channel=True)
    if op == "leakyrelu":
        return _Fn("LeakyRelu", node.number("leakyrelu_alpha", 0.2))
    named = {"sigmoid": "Sigmoid", "elu": "Elu", "tanh": "Tanh"}
    if op not in named:
        raise TfjsGraphError(f"{node.name}: unsupported fused op {op}")
    return _Fn(named[op])


def _apply_fused(c: _Compiler, node: _Node, step: _Conv) -> None:
    """_FusedConv2D / FusedDepthwiseConv2dNative / _FusedMatMul: bias and activation, in order."""
    extra = list(node.inputs[2:])
    for op in (s.lower() for s in node.strings("fused_ops")):
        if op == "biasadd":
            bias = c.const(extra.pop(0))
            if bias is None:
                raise TfjsGraphError(f"{node.name}: fused bias must be a constant")
            step.fold(None, _channel_vector(bias, 4, step.weight.shape[0]))
        elif op == "fusedbatchnorm":
            raise TfjsGraphError(f"{node.name}: fused batch-norm is not supported (nor by TF.js)")
        else:
            step.set_act(_fused_act(c, node, op, extra))


def _h_matmul(c: _Compiler, node: _Node) -> None:
    a, b = node.inputs[:2]
    ta, tb = node.flag("transpose_a"), node.flag("transpose_b")
    w = c.const(b)
    if w is None or ta or c.vals[a].rank != 2:
        if node.op != "MatMul":
            raise TfjsGraphError(f"{node.name}: fused matmul needs a constant right operand")
        c.emit(node.name, _MatMul(ta, tb), c.slots([a, b]), 2)
        return
    step = _Linear(w if tb else w.T, None)
    c.emit(node.name, step, c.slots([a]), 2)
    _apply_fused(c, node, step)


_NP_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "AddV2": np.add, "BiasAdd": np.add, "Sub": np.subtract, "Mul": np.multiply,
    "RealDiv": np.divide, "Div": np.divide, "Maximum": np.maximum, "Minimum": np.minimum,
    "SquaredDifference": lambda a, b: (a - b) ** 2, "Pow": np.power,
}


def _fold_const_binary(c: _Compiler, node: _Node, x: str, k: np.ndarray, const_first: bool) -> bool:
    """x (op) k with a constant k: a clamp, or an affine folded into the producer. True if handled."""
    op = node.op
    if k.size == 1 and op in ("Maximum", "Minimum"):
        v = float(k.reshape(()))
        c.activate(node.name, x, _Clamp(v, INF) if op == "Maximum" else _Clamp(-INF, v))
        return True
    k64 = k.astype(np.float64)
    if op == "Mul":
        return c.affine(node.name, x, k64, None)
    if op in ("Add", "AddV2", "BiasAdd"):
        return c.affine(node.name, x, None, k64)
    if op == "Sub" and not const_first:
        return c.affine(node.name, x, None, -k64)
    if op in ("RealDiv", "Div") and not const_first:
        return c.affine(node.name, x, 1.0 / k64, None)
    return False


def _h_binary(c: _Compiler, node: _Node) -> None:
    a, b = node.inputs
    ka, kb = c.const(a), c.const(b)
    if ka is not None and kb is not None:
        arr = _NP_BINARY[node.op](ka, kb).astype(np.result_type(ka, kb))
        c.vals[node.name] = _Val(arr.ndim, const=arr)
        return
    if ka is not None or kb is not None:
        x, k, first = (b, ka, True) if ka is not None else (a, kb, False)
        if _fold_const_binary(c, node, x, k, first):
            return
        rank = c.vals[x].rank
        step = _Binary(node.op, _phys_const(k, rank), first, (False,))
        c.emit(node.name, step, c.slots([x]), max(rank, k.ndim))
        return
    ra, rb = c.vals[a].rank, c.vals[b].rank
    align = (ra < rb == 4, rb < ra == 4)
    c.emit(node.name, _Binary(node.op, None, False, align), c.slots([a, b]), max(ra, rb))


def _h_relu(c: _Compiler, node: _Node) -> None:
    c.activate(node.name, node.inputs[0], _Clamp(0.0, INF if node.op == "Relu" else 6.0))


def _h_prelu(c: _Compiler, node: _Node) -> None:
    x, alpha = node.inputs[0], c.need_const(node, 1)
    rank = c.vals[x].rank
    vec = _channel_vector(alpha, rank, alpha.size) if rank in (2, 4) else None
    if vec is not None:
        act = _PRelu(torch.from_numpy(vec.astype(np.float32)), per_channel=True)
    else:
        act = _PRelu(torch.from_numpy(_phys_const(alpha, rank).astype(np.float32)), per_channel=False)
    c.activate(node.name, x, act)


def _h_unary(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    alpha = node.number("alpha", 0.2)
    k = c.const(x)
    if k is not None:
        arr = _UNARY[node.op](torch.from_numpy(np.asarray(k, np.float64)), alpha).numpy().astype(k.dtype)
        c.vals[node.name] = _Val(arr.ndim, const=arr)
        return
    c.activate(node.name, x, _Fn(node.op, alpha))


def _h_fused_batch_norm(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    scale, offset, mean, var = (c.need_const(node, i).astype(np.float64) for i in range(1, 5))
    mul = scale / np.sqrt(var + node.number("epsilon", 1e-3))
    add = offset - mean * mul
    if c.affine(node.name, x, mul, add):
        return
    rank = c.vals[x].rank
    step = c.emit(node.name, _Binary("Mul", _phys_const(mul, rank), False, (False,)), c.slots([x]), rank)
    step.act = _Binary("Add", _phys_const(add, rank), False, (False,))


def _h_reduce(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    rank = c.vals[x].rank
    axes = [int(a) for a in np.asarray(c.need_const(node, 1)).reshape(-1)]
    keep = node.flag("keep_dims")
    phys, perm = _drop_dims(axes, rank)
    step = _Reduce(node.op, phys, keep, None if keep else perm)
    c.emit(node.name, step, c.slots([x]), rank if keep else rank - len(set(phys)))


def _h_reshape(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    target = [int(t) for t in np.asarray(c.need_const(node, 1)).reshape(-1)]
    k = c.const(x)
    if k is not None:
        c.vals[node.name] = _Val(len(target), const=k.reshape(target))
        return
    c.emit(node.name, _Reshape(target, c.vals[x].rank), c.slots([x]), len(target))


def _h_squeeze(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    dims = node.ints("squeeze_dims") or node.ints("axis")
    if not dims:
        raise TfjsGraphError(f"{node.name}: Squeeze without explicit dims is not supported")
    rank = c.vals[x].rank
    phys, perm = _drop_dims(dims, rank)
    c.emit(node.name, _Squeeze(phys, perm), c.slots([x]), rank - len(phys))


def _h_pad(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    rank = c.vals[x].rank
    pads = [(int(a), int(b)) for a, b in np.asarray(c.need_const(node, 1)).reshape(-1, 2)]
    if rank == 4:
        pads = [pads[_NHWC_TO_NCHW[d]] for d in range(4)]
    value = float(c.need_const(node, 2).reshape(())) if node.op == "PadV2" else 0.0
    mode = node.string("mode", "CONSTANT").upper() if node.op == "MirrorPad" else "CONSTANT"
    c.emit(node.name, _Pad(pads, mode, value), c.slots([x]), rank)


def _h_concat(c: _Compiler, node: _Node) -> None:
    if node.op == "Concat":
        axis_name, parts = node.inputs[0], node.inputs[1:]
    else:
        axis_name, parts = node.inputs[-1], node.inputs[:-1]
    rank = c.vals[parts[0]].rank
    axis = int(np.asarray(c.vals[axis_name].const).reshape(()))
    c.emit(node.name, _Concat(_phys_axis(axis, rank)), c.slots(parts), rank)


def _h_pool(c: _Compiler, node: _Node) -> None:
    k, s = node.ints("ksize"), node.ints("strides")
    if k[0] != 1 or k[3] != 1 or s[0] != 1 or s[3] != 1:
        raise TfjsGraphError(f"{node.name}: pooling over batch or channels is not supported")
    step = _Pool(node.op, (k[1], k[2]), (s[1], s[2]), node.string("padding", "VALID"))
    c.emit(node.name, step, c.slots(node.inputs[:1]), 4)


def _h_softmax(c: _Compiler, node: _Node) -> None:
    x = node.inputs[0]
    rank = c.vals[x].rank
    step = _Softmax(_phys_axis(-1, rank))
    if node.op == "LogSoftmax":
        step.act = _Fn("Log")
    c.emit(node.name, step, c.slots([x]), rank)


_HANDLERS: dict[str, Callable[[_Compiler, _Node], None]] = {
    "Const": _h_const, "Placeholder": _h_placeholder,
    **{op: _h_pass for op in _PASS_THROUGH}, "Cast": _h_cast,
    **{op: _h_conv for op in ("Conv2D", "DepthwiseConv2dNative", "DepthwiseConv2d", "_FusedConv2D",
                              "FusedDepthwiseConv2dNative")},
    "MatMul": _h_matmul, "_FusedMatMul": _h_matmul,
    **{op: _h_binary for op in _BINARY},
    "Relu": _h_relu, "Relu6": _h_relu, "Prelu": _h_prelu,
    **{op: _h_unary for op in _UNARY},
    "FusedBatchNorm": _h_fused_batch_norm, "FusedBatchNormV3": _h_fused_batch_norm,
    **{op: _h_reduce for op in ("Mean", "Sum", "Max", "Min")},
    "Reshape": _h_reshape, "Squeeze": _h_squeeze,
    "Pad": _h_pad, "PadV2": _h_pad, "MirrorPad": _h_pad,
    "ConcatV2": _h_concat, "Concat": _h_concat,
    "MaxPool": _h_pool, "AvgPool": _h_pool,
    "Softmax": _h_softmax, "LogSoftmax": _h_softmax,
}


# ----------------------------------------------------------------------------------------------- entry point


def load_graph_model(json_path: str | Path, output_node: str | Sequence[str], *, optimize: bool = True,
                     channels_last: bool = True) -> TfjsGraph:
    """Compile a TF.js graph model up to `output_node` (one name -> one tensor, several -> a tuple).

    The module takes NCHW float32 holding the values TF.js is fed (NHWC there) and returns the node's tensor
    as TF.js computes it (rank-4 results NHWC). `optimize=False` keeps every TF op as its own layer (to check
    the fusions); `channels_last` (default) runs the convolutions in channels-last memory format.
    """
    spec, consts = load_weights(json_path)
    nodes = _parse_nodes(spec["modelTopology"])
    if optimize:
        _rewrite(nodes, consts)
    else:
        for node in nodes.values():
            node.inputs = [_resolve(nodes, i) for i in node.inputs]
    names = [output_node] if isinstance(output_node, str) else list(output_node)
    outputs = [_resolve(nodes, _clean(n)) for n in names]
    order = _topo_order(nodes, outputs)
    compiler = _Compiler(nodes, consts, order, outputs, fuse=optimize)
    compiler.compile(order)
    for o in outputs:
        if compiler.vals[o].const is not None:
            raise TfjsGraphError(f"output {o!r} is a constant")
    return compiler.program(outputs, channels_last).eval()
