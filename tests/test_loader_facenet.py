"""The TF GraphDef loader: FaceNet (facenet-vgg, facenet-casia) against its ORIGINAL runtime (TensorFlow CPU),
through the committed fixtures faceveil/data/references/ref_facenet-*.npz (made by
tools/make_references/make_facenet_references.py), input gradients against finite differences, and a small
hand-encoded GraphDef for what the shipped files exercise less (the cond, the cut at the input, TF 'SAME' padding,
run-time shape arithmetic, the wire format's packed and unpacked fields)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from faceveil.io import weights
from faceveil.models import zoo
from faceveil.models.loaders.tf_graphdef import GraphDefError, load_graphdef, read_graphdef
from tests.conftest import needs_weights

FIXTURES = Path(__file__).parents[1] / "faceveil" / "data" / "references"
NAMES = ["facenet-vgg", "facenet-casia"]


def _load(name: str, channels_last: bool = True) -> nn.Module:
    spec = zoo.spec(name)
    feeds = {"phase_train": False} if name == "facenet-vgg" else None
    return load_graphdef(weights.path(spec.files[0]), "embeddings", input_node="input", feeds=feeds,
                         channels_last=channels_last)


def _inputs(data: np.lib.npyio.NpzFile) -> torch.Tensor:
    """The fixture's uint8 NHWC images, normalised in float32 exactly as the reference tool did, as NCHW."""
    x = (data["inputs"].astype(np.float32) - data["mean"]) / data["scale"]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


Loaded = Callable[[str], tuple[nn.Module, torch.Tensor, np.ndarray]]


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    """name -> (converted model, fixture inputs as NCHW float32, reference outputs), each loaded once."""
    cache: dict[str, tuple[nn.Module, torch.Tensor, np.ndarray]] = {}

    def get(name: str) -> tuple[nn.Module, torch.Tensor, np.ndarray]:
        if name not in cache:
            data = np.load(FIXTURES / f"ref_{name}.npz")
            cache[name] = (_load(name), _inputs(data), data["outputs"])
        return cache[name]

    return get


def _check_close(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    diff = float(np.abs(got - expected).max())
    bound = 1e-4 * float(np.abs(expected).max())
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g} (1e-4 x max |reference|)"
    return diff


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_matches_tensorflow(loaded: Loaded, name: str) -> None:
    model, x, expected = loaded(name)
    with torch.no_grad():
        got = model(x).numpy()
    assert got.shape == expected.shape == (3, 512)
    assert got.dtype == np.float32
    diff = _check_close(got, expected, f"{name} vs TensorFlow")
    print(f"{name}: max abs diff {diff:.3g}, max |reference| {np.abs(expected).max():.4g}")


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_any_batch_size_and_layout(loaded: Loaded, name: str) -> None:
    """The casia file fixes batch 1 (its flatten reshapes to [1, -1]); the module must not."""
    model, x, _ = loaded(name)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        five = model(torch.cat([x, x[:2]]))
        plain = _load(name, channels_last=False)(x)
    scale = float(batch.abs().max())
    assert float((batch - single).abs().max()) <= 1e-5 * scale
    assert float((five[:3] - batch).abs().max()) <= 1e-5 * scale
    assert float((plain - batch).abs().max()) <= 1e-5 * scale


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_input_gradient_matches_finite_differences(loaded: Loaded, name: str) -> None:
    model, x, _ = loaded(name)
    model64 = _load(name, channels_last=False).double()
    x64 = x[2:3].double().requires_grad_(True)  # the drawn face, batch 1
    w = torch.randn(1, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (grad,) = torch.autograd.grad((model64(x64) * w).sum(), x64)
    rng = torch.Generator().manual_seed(1)
    # A ReLU network: a step must cross few kinks (1e-8), float64 rounding then costs ~1e-7 relative.
    h = 1e-8
    for _ in range(3):
        v = torch.randn(x64.shape, generator=rng, dtype=torch.float64)
        with torch.no_grad():
            numeric = ((model64(x64 + h * v) - model64(x64 - h * v)) * w).sum() / (2 * h)
        analytic = (grad * v).sum()
        rel = abs(float(numeric - analytic)) / max(abs(float(numeric)), 1e-12)
        assert rel < 1e-4, f"{name}: autograd {float(analytic):.8g} vs FD {float(numeric):.8g}, rel {rel:.2g}"
        print(f"{name}: directional derivative rel diff {rel:.2g}")
    x32 = x[2:3].clone().requires_grad_(True)  # the float32 module (what attacks use): the same gradient
    (grad32,) = torch.autograd.grad((model(x32) * w.float()).sum(), x32)
    rel32 = float((grad32.double() - grad).norm() / grad.norm())
    assert rel32 < 1e-3, f"{name}: float32 gradient differs from float64 by {rel32:.3g} (relative L2)"


@needs_weights
@pytest.mark.slow
def test_vgg_graph_needs_the_phase_train_feed() -> None:
    path = weights.path(zoo.spec("facenet-vgg").files[0])
    with pytest.raises(GraphDefError, match="phase_train"):
        load_graphdef(path, "embeddings", input_node="input")


# ----------------------------------------------------------------------------------------------- a tiny GraphDef


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negatives as 64-bit two's complement, as protobuf writes int32 / int64
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _tensor(arr: np.ndarray, packed: bool = True) -> bytes:
    """TensorProto: float32 as tensor_content; int32 as int_val (packed, or one field per value)."""
    shape = b"".join(_bytes(2, _int(1, d)) for d in arr.shape)
    if arr.dtype == np.float32:
        return _int(1, 1) + _bytes(2, shape) + _bytes(4, arr.tobytes())
    values = [int(v) for v in arr.reshape(-1)]
    body = _bytes(7, b"".join(_varint(v) for v in values)) if packed else b"".join(_int(7, v) for v in values)
    return _int(1, 3) + _bytes(2, shape) + body


def _attr(value: object) -> bytes:
    if isinstance(value, bool):
        return _int(5, int(value))
    if isinstance(value, int):
        return _int(3, value)
    if isinstance(value, float):
        return _varint(4 << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, str):
        return _bytes(2, value)
    if isinstance(value, list):
        return _bytes(1, _bytes(3, b"".join(_varint(v) for v in value)))
    return _bytes(8, _tensor(*value) if isinstance(value, tuple) else _tensor(value))  # type: ignore[arg-type]


def _node(name: str, op: str, *inputs: str, **attrs: object) -> bytes:
    out = _bytes(1, name) + _bytes(2, op) + b"".join(_bytes(3, i) for i in inputs)
    for key, value in attrs.items():
        attr = _int(6, value) if key == "dtype" else _attr(value)  # type: ignore[arg-type]  # a DataType enum
        out += _bytes(5, _bytes(1, key) + _bytes(2, attr))
    return _bytes(1, out)


def _const(name: str, arr: np.ndarray, packed: bool = True) -> bytes:
    return _node(name, "Const", value=(arr, packed), dtype=1 if arr.dtype == np.float32 else 3)


def _tiny_graph(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """queue -> input -> Conv2D SAME stride 2 (asymmetric pad on 8x8) -> cond(phase_train: train BN, moving BN)
    -> Relu -> flatten via Shape/StridedSlice/Pack/Reshape -> MatMul -> out. Returns the weights."""
    p = {"w": rng.normal(0, 0.5, (3, 3, 2, 4)).astype(np.float32),
         "mean": rng.normal(0, 0.3, 4).astype(np.float32), "var": rng.uniform(0.5, 2, 4).astype(np.float32),
         "beta": rng.normal(0, 0.3, 4).astype(np.float32), "fc": rng.normal(0, 0.3, (64, 3)).astype(np.float32)}
    empty = np.zeros(0, np.float32)
    nodes = [
        _node("phase_train", "Placeholder", dtype=10),
        _node("queue", "FIFOQueueV2"),
        _node("input", "Identity", "queue"),
        _const("w", p["w"]), _node("w/read", "Identity", "w"),
        _node("conv", "Conv2D", "input", "w/read", strides=[1, 2, 2, 1], padding="SAME", data_format="NHWC"),
        _const("gamma", np.ones(4, np.float32)), _const("beta", p["beta"]),
        _const("mean", p["mean"]), _const("var", p["var"]), _const("empty", empty),
        _node("cond/pred_id", "Identity", "phase_train"),
        _node("cond/Switch", "Switch", "conv", "cond/pred_id"),
        _node("cond/bn_train", "FusedBatchNorm", "cond/Switch:1", "gamma", "beta", "empty", "empty",
              epsilon=0.001, is_training=True),
        _node("cond/bn", "FusedBatchNorm", "cond/Switch", "gamma", "beta", "mean", "var", "^cond/pred_id",
              epsilon=0.001, is_training=False),
        _node("cond/Merge", "Merge", "cond/bn", "cond/bn_train"),
        _node("relu", "Relu", "cond/Merge"),
        _node("shape", "Shape", "relu"),
        _const("b", np.array([0], np.int32)), _const("e", np.array([1], np.int32), packed=False),
        _const("s", np.array([1], np.int32)),
        _node("batch", "StridedSlice", "shape", "b", "e", "s", shrink_axis_mask=1),
        _const("minus_one", np.array(-1, np.int32)),
        _node("target", "Pack", "batch", "minus_one", axis=0),
        _node("flat", "Reshape", "relu", "target"),
        _const("fc", p["fc"]),
        _node("mm", "MatMul", "flat", "fc"),
        _node("out", "Identity", "mm"),
    ]
    path.write_bytes(b"".join(nodes))
    return p


def _tiny_reference(x: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
    """The tiny graph written directly in torch (float64): NCHW in, TF's NHWC flatten order."""
    w = torch.from_numpy(p["w"]).double().permute(3, 2, 0, 1)
    y = F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2)  # TF SAME on 8 with k 3, s 2: pad 0 before, 1 after
    scale = 1 / torch.sqrt(torch.from_numpy(p["var"]).double() + 1e-3)
    y = (y - torch.from_numpy(p["mean"]).double()[:, None, None]) * scale[:, None, None]
    y = torch.relu(y + torch.from_numpy(p["beta"]).double()[:, None, None])
    return y.permute(0, 2, 3, 1).reshape(len(x), -1) @ torch.from_numpy(p["fc"]).double()


def test_tiny_graph_inference_branch_and_shape_arithmetic(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pb"
    p = _tiny_graph(path, np.random.default_rng(4))
    model = load_graphdef(path, "out", input_node="input", feeds={"phase_train": False})
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x).double()
        one = model(x[:1]).double()
    want = _tiny_reference(x.double(), p)
    assert got.shape == (3, 3)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert torch.allclose(one, got[:1], rtol=0, atol=1e-6)
    nodes = {n["name"]: n for n in read_graphdef(path)}
    assert nodes["cond/bn"]["input"][-1] == "^cond/pred_id"
    assert nodes["b"]["attr"]["dtype"] == {"type": "DT_INT32"}


def test_tiny_graph_needs_its_feed_and_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pb"
    _tiny_graph(path, np.random.default_rng(4))
    with pytest.raises(GraphDefError, match="phase_train"):
        load_graphdef(path, "out", input_node="input")
    with pytest.raises(GraphDefError, match="training mode"):
        load_graphdef(path, "out", input_node="input", feeds={"phase_train": True})
    with pytest.raises(GraphDefError, match="no node"):
        load_graphdef(path, "out", input_node="nope", feeds={"phase_train": False})
    with pytest.raises(GraphDefError):  # without the cut, the queue feeding `input` is not compilable
        load_graphdef(path, "out", feeds={"phase_train": False})
    with pytest.raises(GraphDefError, match="no such file"):
        load_graphdef(tmp_path / "missing.pb", "out")
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\x0a\xff\xff\xff\x0fjunk")
    with pytest.raises(GraphDefError, match="not a readable"):
        load_graphdef(junk, "out")
