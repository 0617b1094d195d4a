"""TensorFlow 1.x frozen GraphDef (.pb) compiled into a PyTorch module, written for the FaceNet recognisers
(Inception-ResNet-v1: `facenet-vgg` 20180402-114759.pb, `facenet-casia` graph_final.pb).

A TF.js model.json topology is a GraphDef written as JSON, so the TF.js compiler (`tfjs._Compiler`: conv / batch-norm
/ bias / scale folding, TF 'SAME' padding, NHWC -> NCHW layout) compiles these graphs too. What this module adds:

- a protobuf wire-format reader for GraphDef / NodeDef / AttrValue / TensorProto (no TensorFlow, no generated
  message classes): nodes come out in the TF.js JSON form, Const tensors as numpy arrays;
- the inference branch of TF 1.x control flow: `feeds` fixes placeholders (FaceNet's `phase_train` = False), each
  Switch forwards its data to the taken side only, each Merge takes its one live input, and nodes fed by a dead
  side are dropped (so batch-norm uses its moving statistics and dropout is the identity);
- a graph cut at `input_node` (FaceNet-vgg feeds its `input` Identity from a training FIFOQueue);
- shape arithmetic evaluated at run time (Shape, StridedSlice, Pack feeding a Reshape: slim's flatten), so any
  batch size works.

The module takes the NCHW float32 batch whose NHWC transpose TensorFlow is fed, and returns the output node's
tensor (for FaceNet: the L2-normalised 512-d embedding). Parameters are frozen: gradients reach the input only.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from faceveil.models.loaders import tfjs
from faceveil.models.loaders.tfjs import TfjsGraph, TfjsGraphError

__all__ = ["load_graphdef", "read_graphdef", "GraphDefError"]

_NCHW_TO_NHWC = (0, 2, 3, 1)
_NHWC_TO_NCHW = (0, 3, 1, 2)


class GraphDefError(TfjsGraphError):
    """A .pb file this loader cannot read or compile."""


# ----------------------------------------------------------------------------------------------- wire format

_DTYPES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 6: "DT_INT8", 7: "DT_STRING",
           9: "DT_INT64", 10: "DT_BOOL", 19: "DT_HALF"}
_NUMPY = {"DT_FLOAT": "<f4", "DT_DOUBLE": "<f8", "DT_INT32": "<i4", "DT_UINT8": "u1", "DT_INT8": "i1",
          "DT_INT64": "<i8", "DT_BOOL": "?", "DT_HALF": "<f2"}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _signed(value: int) -> int:
    """A varint holding a negative int32 / int64 is its 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: an int for varints, the raw bytes otherwise."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            value, pos = buf[pos:pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        else:
            raise GraphDefError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise GraphDefError(f"protobuf field {number} runs past the end of its message")
        yield number, wire, value


def _repeated(wire: int, value: int | memoryview, fmt: str) -> list:
    """Values of a repeated scalar field, packed (wire type 2) or not; fmt 'v' = varint, else a struct code."""
    if fmt == "v":
        if wire != 2:
            return [_signed(value)]  # type: ignore[arg-type]
        out, pos = [], 0
        while pos < len(value):  # type: ignore[arg-type]
            v, pos = _varint(value, pos)  # type: ignore[arg-type]
            out.append(_signed(v))
        return out
    return list(struct.unpack(f"<{len(value) // struct.calcsize(fmt)}{fmt}", value))  # type: ignore[arg-type]


def _shape(buf: memoryview) -> list[int]:
    """TensorShapeProto -> dims (-1 = unknown)."""
    dims = []
    for number, _, dim in _fields(buf):
        if number == 2:
            dims.append(next((_signed(v) for n, _, v in _fields(dim) if n == 1), 0))  # type: ignore[arg-type]
    return dims


def _tensor(buf: memoryview) -> np.ndarray:
    """TensorProto -> numpy array (tensor_content, or the typed *_val fields with TF's repeat-the-last rule)."""
    dtype, dims, content, values = "DT_FLOAT", [], None, []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype = _DTYPES.get(value, f"enum {value}")  # type: ignore[arg-type]
        elif number == 2:
            dims = _shape(value)  # type: ignore[arg-type]
        elif number == 4:
            content = bytes(value)  # type: ignore[arg-type]
        elif number == 5:
            values += _repeated(wire, value, "f")
        elif number == 6:
            values += _repeated(wire, value, "d")
        elif number in (7, 10, 11, 13):  # int_val, int64_val, bool_val, half_val (as uint16 bits)
            values += _repeated(wire, value, "v")
    if dtype not in _NUMPY:
        raise GraphDefError(f"constant of type {dtype} is not supported")
    count = int(np.prod(dims)) if dims else 1
    if content is not None:
        return np.frombuffer(content, dtype=_NUMPY[dtype]).reshape(dims).copy()
    if dtype == "DT_HALF":
        values = list(np.asarray(values, np.uint16).view(np.float16))
    if len(values) < count:  # TF stores a constant fill as one value
        values += [values[-1] if values else 0] * (count - len(values))
    return np.asarray(values, dtype=_NUMPY[dtype]).reshape(dims)


def _attr(buf: memoryview) -> dict:
    """AttrValue -> its protobuf-JSON form, as TF.js model.json writes it (strings base64)."""
    out: dict = {}
    for number, _, value in _fields(buf):
        if number == 1:
            out["list"] = _attr_list(value)  # type: ignore[arg-type]
        elif number == 2:
            out["s"] = base64.b64encode(bytes(value)).decode()  # type: ignore[arg-type]
        elif number == 3:
            out["i"] = _signed(value)  # type: ignore[arg-type]
        elif number == 4:
            out["f"] = struct.unpack("<f", value)[0]  # type: ignore[arg-type]
        elif number == 5:
            out["b"] = bool(value)
        elif number == 6:
            out["type"] = _DTYPES.get(value, f"enum {value}")  # type: ignore[arg-type]
        elif number == 7:
            out["shape"] = {"dim": [{"size": d} for d in _shape(value)]}  # type: ignore[arg-type]
        elif number == 8:
            out["tensor"] = value  # decoded only for the Const nodes that are compiled
    return out


def _attr_list(buf: memoryview) -> dict:
    out: dict[str, list] = {}
    for number, wire, value in _fields(buf):
        if number == 2:
            out.setdefault("s", []).append(base64.b64encode(bytes(value)).decode())  # type: ignore[arg-type]
        elif number == 3:
            out.setdefault("i", []).extend(_repeated(wire, value, "v"))
        elif number == 4:
            out.setdefault("f", []).extend(_repeated(wire, value, "f"))
        elif number == 5:
            out.setdefault("b", []).extend(bool(v) for v in _repeated(wire, value, "v"))
        elif number == 6:
            out.setdefault("type", []).extend(_DTYPES.get(v, f"enum {v}") for v in _repeated(wire, value, "v"))
    return out


def _node(buf: memoryview) -> dict:
    node: dict = {"input": [], "attr": {}}
    for number, _, value in _fields(buf):
        if number == 1:
            node["name"] = bytes(value).decode()  # type: ignore[arg-type]
        elif number == 2:
            node["op"] = bytes(value).decode()  # type: ignore[arg-type]
        elif number == 3:
            node["input"].append(bytes(value).decode())  # type: ignore[arg-type]
        elif number == 5:  # map<string, AttrValue> entry
            entry = dict((n, v) for n, _, v in _fields(value))  # type: ignore[arg-type]
            node["attr"][bytes(entry.get(1, b"")).decode()] = _attr(entry.get(2, memoryview(b"")))
    return node


def read_graphdef(path: str | Path) -> list[dict]:
    """The nodes of a GraphDef file, each {name, op, input, attr} in TF.js JSON form (attr 'tensor' raw)."""
    try:
        data = memoryview(Path(path).read_bytes())
        nodes = [_node(value) for number, _, value in _fields(data) if number == 1]  # type: ignore[arg-type]
    except (GraphDefError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise GraphDefError(f"{path} is not a readable TensorFlow GraphDef ({exc})") from exc
    if not nodes or any("name" not in n or "op" not in n for n in nodes):
        raise GraphDefError(f"{path} is not a readable TensorFlow GraphDef (no nodes)")
    return nodes


# ----------------------------------------------------------------------------------------------- control flow

_DEAD = "<dead>"


def _split(ref: str) -> tuple[str, int]:
    name, _, index = ref.partition(":")
    return name, int(index or 0)


def _postorder(nodes: dict[str, dict], outputs: Sequence[str]) -> list[str]:
    """Every node `outputs` depend on through data inputs (not control inputs), inputs first."""
    return tfjs.topological_order([_split(o)[0] for o in outputs],
                                  lambda name: [_split(i)[0] for i in nodes[name]["input"] if not i.startswith("^")],
                                  nodes, GraphDefError)


def _take_branches(nodes: dict[str, dict], output: str, feeds: Mapping[str, bool]) -> str:
    """Resolve Switch / Merge for fixed predicates, in place: every node the output needs is rewired to the live
    tensors (control inputs dropped). Returns the output's live tensor."""
    alias: dict[str, str] = {}  # "switch:k" / "merge:0" -> the tensor it forwards, or _DEAD
    dead: set[str] = set()  # nodes fed by a branch not taken

    def resolve(ref: str) -> str:
        name, index = _split(ref)
        return _DEAD if name in dead else alias.get(f"{name}:{index}", ref)

    def predicate(ref: str) -> bool:
        name = _split(resolve(ref))[0]
        while nodes[name]["op"] == "Identity":
            name = _split(resolve(nodes[name]["input"][0]))[0]
        if name not in feeds:
            raise GraphDefError(f"Switch on {name!r}: give its value in `feeds` to take one branch")
        return bool(feeds[name])

    for name in _postorder(nodes, [output]):
        node = nodes[name]
        data = [resolve(i) for i in node["input"] if not i.startswith("^")]
        if node["op"] == "Switch":
            taken = int(predicate(node["input"][1]))
            alias[f"{name}:{taken}"], alias[f"{name}:{1 - taken}"] = data[0], _DEAD
        elif node["op"] == "Merge":
            live = [d for d in data if d != _DEAD]
            if len(live) > 1:
                raise GraphDefError(f"Merge {name!r} has {len(live)} live inputs: the branch is not decided")
            alias[f"{name}:0"] = live[0] if live else _DEAD
        elif _DEAD in data:
            dead.add(name)
        else:
            node["input"] = data
    live_output = resolve(output)
    if live_output == _DEAD:
        raise GraphDefError(f"output {output!r} is not computed for these feeds")
    return live_output


# ----------------------------------------------------------------------------------------------- shape arithmetic


class _ShapeOf(tfjs._Step):
    """tf.shape: the logical (NHWC) shape of a tensor as an int64 vector."""

    def run(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.shape if x.dim() != 4 else (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
        return torch.tensor(dims, dtype=torch.int64)


class _Slice(tfjs._Step):
    """StridedSlice of a vector: one slice, or one element (shrink_axis_mask)."""

    def __init__(self, index: slice | int) -> None:
        super().__init__()
        self.index = index

    def run(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.index]


class _Pack(tfjs._Step):
    """tf.stack of computed int tensors and constants (`parts`: None = the next computed input)."""

    def __init__(self, parts: list[np.ndarray | None], axis: int) -> None:
        super().__init__()
        self.parts, self.axis = parts, axis

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        computed = iter(xs)
        parts = [next(computed) if p is None else torch.from_numpy(p).to(torch.int64) for p in self.parts]
        return torch.stack(parts, self.axis)


class _ReshapeTo(tfjs._Step):
    """Reshape to a computed target shape, in TF's (logical NHWC) element order."""

    def __init__(self, in_rank: int) -> None:
        super().__init__()
        self.in_rank = in_rank

    def run(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        if self.in_rank == 4:
            x = x.permute(*_NCHW_TO_NHWC)
        y = x.reshape([int(d) for d in shape.tolist()])
        return y.permute(*_NHWC_TO_NCHW) if y.dim() == 4 else y


class _Compiler(tfjs._Compiler):
    """The TF.js compiler plus the int-vector ops of shape arithmetic; `lengths` holds each vector's length."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lengths: dict[str, int] = {}

    def compile(self, order: list[str]) -> None:
        for name in order:
            node = self.nodes[name]
            handler = _HANDLERS.get(node.op) or tfjs._HANDLERS.get(node.op)
            if handler is None:
                raise GraphDefError(f"unsupported TensorFlow op {node.op} (node {name!r})")
            handler(self, node)

    def length(self, name: str) -> int:
        const = self.const(name)
        if const is not None:
            return int(const.size)
        if name not in self.lengths:
            raise GraphDefError(f"{name!r}: the length of this shape vector is not known when compiling")
        return self.lengths[name]


def _h_shape(c: _Compiler, node: tfjs._Node) -> None:
    x = node.inputs[0]
    c.emit(node.name, _ShapeOf(), c.slots([x]), 1)
    c.lengths[node.name] = c.vals[x].rank


def _h_strided_slice(c: _Compiler, node: tfjs._Node) -> None:
    begin, end, stride = (int(c.need_const(node, i).reshape(-1)[0]) for i in (1, 2, 3))
    attr = {k: int(node.attr.get(k, {}).get("i", 0)) for k in
            ("begin_mask", "end_mask", "shrink_axis_mask", "ellipsis_mask", "new_axis_mask")}
    if attr["ellipsis_mask"] or attr["new_axis_mask"] or c.need_const(node, 1).size != 1:
        raise GraphDefError(f"{node.name}: only one-axis StridedSlice is supported")
    if attr["shrink_axis_mask"] & 1:
        index: slice | int = begin
    else:
        index = slice(None if attr["begin_mask"] & 1 else begin, None if attr["end_mask"] & 1 else end, stride)
    x = node.inputs[0]
    const = c.const(x)
    if const is not None:
        arr = np.asarray(const[index])
        c.vals[node.name] = tfjs._Val(arr.ndim, const=arr)
        return
    c.emit(node.name, _Slice(index), c.slots([x]), 0 if isinstance(index, int) else 1)
    if isinstance(index, slice):
        c.lengths[node.name] = len(range(c.length(x))[index])


def _h_pack(c: _Compiler, node: tfjs._Node) -> None:
    axis = int(node.attr.get("axis", {}).get("i", 0))
    consts = [c.const(i) for i in node.inputs]
    if all(k is not None for k in consts):
        arr = np.stack(consts, axis)  # type: ignore[arg-type]
        c.vals[node.name] = tfjs._Val(arr.ndim, const=arr)
        return
    computed = [i for i, k in zip(node.inputs, consts, strict=True) if k is None]
    rank = c.vals[computed[0]].rank + 1
    if rank != 1:
        raise GraphDefError(f"{node.name}: only Pack of scalars (a shape vector) is supported")
    c.emit(node.name, _Pack(consts, axis), c.slots(computed), rank)
    c.lengths[node.name] = len(node.inputs)


def _h_reshape(c: _Compiler, node: tfjs._Node) -> None:
    x, target = node.inputs[:2]
    if c.const(target) is not None:
        return tfjs._HANDLERS["Reshape"](c, node)
    c.emit(node.name, _ReshapeTo(c.vals[x].rank), c.slots([x, target]), c.length(target))


_HANDLERS: dict[str, Callable[[_Compiler, tfjs._Node], None]] = {
    "Shape": _h_shape, "StridedSlice": _h_strided_slice, "Pack": _h_pack, "Reshape": _h_reshape,
}


# ----------------------------------------------------------------------------------------------- entry point


def load_graphdef(path: str | Path, output_node: str, *, input_node: str | None = None,
                  feeds: Mapping[str, bool] | None = None, channels_last: bool = True) -> TfjsGraph:
    """Compile the GraphDef at `path` from `input_node` (default: its one Placeholder) to `output_node`.

    `feeds` fixes boolean placeholders (e.g. {'phase_train': False}) so that TF 1.x conds take one branch.
    The module takes NCHW float32 holding the values TensorFlow is fed (NHWC there) and returns the output
    tensor as TensorFlow computes it (rank-4 results NHWC).
    """
    if not Path(path).is_file():
        raise GraphDefError(f"{path}: no such file")
    nodes = {n["name"]: n for n in read_graphdef(path)}
    if input_node is not None:  # cut the graph: whatever fed this node (a queue, a reader) is not needed
        if input_node not in nodes:
            raise GraphDefError(f"graph has no node {input_node!r}")
        nodes[input_node] = {"name": input_node, "op": "Placeholder", "input": [], "attr": {}}
    output = _take_branches(nodes, output_node, feeds or {})
    parsed = tfjs._parse_nodes({"node": list(nodes.values())})
    tfjs._rewrite(parsed, {})
    outputs = [tfjs._resolve(parsed, tfjs._clean(output))]
    order = tfjs._topo_order(parsed, outputs)
    training = [n for n in order if parsed[n].op.startswith("FusedBatchNorm") and parsed[n].flag("is_training")]
    if training:  # batch statistics of the batch itself: not what a recogniser computes at inference
        raise GraphDefError(f"{training[0]!r} normalises in training mode: feed the inference branch")
    consts = {name: _tensor(parsed[name].attr["value"]["tensor"]) for name in order if parsed[name].op == "Const"}
    compiler = _Compiler(parsed, consts, order, outputs, fuse=True)
    compiler.compile(order)
    if compiler.vals[outputs[0]].const is not None:
        raise GraphDefError(f"output {output_node!r} is a constant")
    module = compiler.program(outputs, channels_last).eval()
    module.requires_grad_(False)
    return module
