"""The ONNX (mfn512) and TFLite (mfn192) loaders against their ORIGINAL runtimes (onnxruntime 1.31.1 and
TensorFlow Lite via ai-edge-litert 2.3.0), through the committed fixtures faceveil/data/references/ref_mfn512.npz and
ref_mfn192.npz (made by tools/make_references/make_onnx_tflite_references.py), and their input gradients
against finite differences. onnxruntime, when importable, is also compared live."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from faceveil.io import weights
from faceveil.models.loaders import tflite_graph
from faceveil.models.loaders.onnx_graph import OnnxConversionError, load_onnx
from faceveil.models.loaders.tflite_graph import TfliteConversionError, load_tflite

FIXTURES = Path(__file__).parents[1] / "faceveil" / "data" / "references"
MODELS = {
    "mfn512": (weights.home() / "onnx" / "fr_feature.onnx", load_onnx, 512),
    "mfn192": (weights.home() / "tflite" / "MobileFaceNet.tflite", load_tflite, 192),
}


def _needs(name: str):
    path = MODELS[name][0]
    return pytest.mark.skipif(
        not path.is_file(), reason=f"{name} weight file {path} missing: run `faceveil models fetch`"
    )


PARAMS = [pytest.param(name, marks=_needs(name)) for name in MODELS]


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
            path, load, _ = MODELS[name]
            data = np.load(FIXTURES / f"ref_{name}.npz")
            cache[name] = (load(path), _inputs(data), data["outputs"])
        return cache[name]

    return get


def _check_close(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    diff = float(np.abs(got - expected).max())
    bound = 1e-4 * float(np.abs(expected).max())
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g} (1e-4 x max |reference|)"
    return diff


@pytest.mark.parametrize("name", PARAMS)
def test_matches_original_runtime(loaded: Loaded, name: str) -> None:
    model, x, expected = loaded(name)
    with torch.no_grad():
        got = model(x).numpy()
    assert got.shape == expected.shape == (3, MODELS[name][2])
    assert got.dtype == np.float32
    diff = _check_close(got, expected, f"{name} vs original runtime")
    print(f"{name}: max abs diff {diff:.3g}, max |reference| {np.abs(expected).max():.4g}")


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.slow
def test_any_batch_size_and_layout(loaded: Loaded, name: str) -> None:
    """The files fix the batch (1 for mfn512, 2 for mfn192); the modules must not."""
    model, x, _ = loaded(name)
    path, load, _ = MODELS[name]
    nchw = load(path, channels_last=False)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        five = model(torch.cat([x, x[:2]]))
        plain = nchw(x)
    scale = float(batch.abs().max())
    assert float((batch - single).abs().max()) <= 1e-5 * scale
    assert float((five[:3] - batch).abs().max()) <= 1e-5 * scale
    assert float((plain - batch).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.slow
def test_input_gradient_matches_finite_differences(loaded: Loaded, name: str) -> None:
    model, x, _ = loaded(name)
    path, load, _ = MODELS[name]
    model64 = load(path, channels_last=False).double()  # float64 convs run twice as fast in NCHW
    x64 = x[2:3].double().requires_grad_(True)  # the drawn face, batch 1
    w = torch.randn(1, MODELS[name][2], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (grad,) = torch.autograd.grad((model64(x64) * w).sum(), x64)
    rng = torch.Generator().manual_seed(1)
    # Inputs are ~[-1, 1]. These nets are piecewise linear (PReLU) with millions of units: steps of 1e-5 to
    # 1e-6 still cross enough kinks to move FD by 0.01-0.3 %, so step 1e-8; float64 rounding costs ~1e-7.
    h = 1e-8
    for _ in range(3):
        v = torch.randn(x64.shape, generator=rng, dtype=torch.float64)
        with torch.no_grad():
            numeric = ((model64(x64 + h * v) - model64(x64 - h * v)) * w).sum() / (2 * h)
        analytic = (grad * v).sum()
        rel = abs(float(numeric - analytic)) / max(abs(float(numeric)), 1e-12)
        assert rel < 1e-4, f"{name}: autograd {float(analytic):.8g} vs FD {float(numeric):.8g}, rel {rel:.2g}"
        print(f"{name}: directional derivative rel diff {rel:.2g}")
    # the float32 module (what attacks use) gives the same gradient up to float32 rounding
    x32 = x[2:3].clone().requires_grad_(True)
    (grad32,) = torch.autograd.grad((model(x32) * w.float()).sum(), x32)
    rel32 = float((grad32.double() - grad).norm() / grad.norm())
    assert rel32 < 1e-3, f"{name}: float32 gradient differs from float64 by {rel32:.3g} (relative L2)"


@_needs("mfn192")
def test_tflite_prelu_fusion_is_exact(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusing RELU/ABS/SUB/MUL/ADD into nn.PReLU(2m) changes nothing: compare with the op-by-op graph."""
    _, x, expected = loaded("mfn192")
    fused = load_tflite(MODELS["mfn192"][0], channels_last=False)
    monkeypatch.setattr(tflite_graph, "_find_prelu_patterns", lambda builder: ({}, set()))
    unfused = load_tflite(MODELS["mfn192"][0], channels_last=False)
    assert sum(isinstance(m, nn.PReLU) for m in fused.modules()) == 33
    assert not any(isinstance(m, nn.PReLU) for m in unfused.modules())
    with torch.no_grad():
        got, want = unfused(x), fused(x)
    _check_close(got.numpy(), expected, "mfn192 unfused vs TFLite")
    assert torch.equal(got, want), f"fused vs op-by-op: max abs diff {float((got - want).abs().max()):.3g}"


@_needs("mfn512")
def test_onnx_live_against_onnxruntime(loaded: Loaded) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) missing: live check skipped")
    model, _, _ = loaded("mfn512")
    session = ort.InferenceSession(str(MODELS["mfn512"][0]), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(3).uniform(-1.0, 1.0, (4, 3, 112, 112)).astype(np.float32)
    expected = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    _check_close(got, expected, "mfn512 vs live onnxruntime")


def test_rejects_unsupported_files(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softsign", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "softsign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(OnnxConversionError, match="Softsign"):
        load_onnx(path)
    with pytest.raises(OnnxConversionError):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.tflite").write_bytes(b"\x10\x00\x00\x00junk-not-a-flatbuffer")
    with pytest.raises(TfliteConversionError):
        load_tflite(tmp_path / "junk.tflite")


def _tiny_onnx(path: Path) -> None:
    """Ops the shipped file does not use: Conv with asymmetric pads + BatchNormalization (folded), Relu, a
    constant Add, GlobalAveragePool, Flatten, Gemm (transB), MatMul, Reshape [1, -1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)

    def init(name: str, *shape: int, low: float = -0.5, high: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[0, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["n1"], epsilon=1e-3),
        helper.make_node("PRelu", ["n1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Add", ["r2", "bias4d"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y1"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["y1", "mm"], ["y2"]),
        helper.make_node("Reshape", ["y2", "shape"], ["y"]),
    ]
    inits = [
        init("w1", 4, 3, 3, 3), init("b1", 4), init("g", 4, low=0.5, high=1.5), init("beta", 4),
        init("mu", 4), init("var", 4, low=0.1, high=1.0), init("slope", 4, 1, 1), init("w2", 4, 1, 3, 3),
        init("bias4d", 4, 1, 1), init("fc", 6, 4), init("fcb", 6), init("mm", 6, 5),
        numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by older onnxruntime too
    onnx.save(model, str(path))


def test_onnx_generic_ops_against_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) missing: live check skipped")
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    model = load_onnx(path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "BatchNormalization not folded"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(6).uniform(-1.0, 1.0, (3, 3, 10, 10)).astype(np.float32)
    expected = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    _check_close(got, expected, "tiny ONNX graph vs onnxruntime")
