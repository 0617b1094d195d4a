"""The TF.js graph-model loader against the original runtime (TF.js 4.22.0, fixtures made by
tools/make_references/make_tfjs_references.py), its input gradients against finite differences, and the
weight-manifest decoding on small synthetic models."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from faceveil.io import weights
from faceveil.models.loaders.tfjs import TfjsGraphError, load_graph_model, load_weights

FIXTURES = Path(__file__).parents[1] / "faceveil" / "data" / "references"
OUTPUT_NODE = {"mobileface": "batchnorm0/add_1", "faceres": "global_pooling/Mean",
               "faceres-deep": "global_pooling/Mean"}
BLAZEFACE_OUTPUTS = ("Identity", "Identity_1", "Identity_2", "Identity_3")


def model_json(name: str) -> Path:
    """The cached model.json, or a skip saying how to get it."""
    path = weights.home() / "human" / f"{name}.json"
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        pytest.skip(f"weights for {name} not in {path.parent}: run ./setup.sh (faceveil models fetch)")
    return path


@functools.cache
def load(name: str, **options: bool) -> torch.nn.Module:
    return load_graph_model(model_json(name), OUTPUT_NODE[name], **options)


def reference(name: str) -> tuple[torch.Tensor, np.ndarray]:
    """Fixture inputs as NCHW float32 (the values TF.js was fed) and TF.js's outputs."""
    ref = np.load(FIXTURES / f"ref_{name}.npz")
    assert str(ref["node"]) == OUTPUT_NODE[name]
    x = torch.from_numpy(ref["inputs"].astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    return x, ref["outputs"]


@pytest.mark.parametrize("options", [{}, {"channels_last": False}, {"optimize": False}],
                         ids=["default", "nchw", "unfused"])
@pytest.mark.parametrize("name", list(OUTPUT_NODE))
def test_matches_tfjs(name: str, options: dict) -> None:
    model = load(name, **options)
    x, expected = reference(name)
    with torch.no_grad():
        out = model(x).numpy()
    assert out.shape == expected.shape
    scale = float(np.abs(expected).max())
    diff = float(np.abs(out - expected).max())
    assert diff <= 1e-4 * scale, f"{name}: max abs diff {diff:.3g} vs TF.js 4.22 (output scale {scale:.3g})"


def directional_error(model: torch.nn.Module, x: torch.Tensor, seed: int) -> float:
    """|autograd - central difference| / |central difference| of <proj, model(x)> along a random direction."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_(True)
    proj = torch.randn(model(x).shape, generator=gen, dtype=x.dtype)
    (grad,) = torch.autograd.grad((model(x) * proj).sum(), x)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    h = 1e-7  # inputs are 0..255: small enough to stay clear of the ReLU6 / PReLU kinks
    with torch.no_grad():
        fd = ((model(x + h * v) * proj).sum() - (model(x - h * v) * proj).sum()) / (2 * h)
    return float(abs((grad * v).sum() - fd) / abs(fd))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """float64 grouped convs run group by group: thousands of tiny parallel regions, slow on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(OUTPUT_NODE))
@pytest.mark.slow
def test_input_gradient_matches_finite_differences(name: str) -> None:
    model = load(name)
    model64 = copy.deepcopy(model).double()
    x, _ = reference(name)
    if name != "mobileface":  # faceres pools globally: a centre crop keeps the float64 depthwise convs quick
        x = x[..., 64:160, 64:160].contiguous()
    x64 = x.double()
    errors = [directional_error(model64, x64, seed) for seed in range(3)]
    assert max(errors) < 1e-4, f"{name}: directional derivative relative errors {errors}"
    # the float32 module computes the same gradient (up to float32 rounding near the kinks)
    x32 = x.clone().requires_grad_(True)
    proj = torch.randn(2, model(x).shape[1], generator=torch.Generator().manual_seed(0))
    (g32,) = torch.autograd.grad((model(x32) * proj).sum(), x32)
    x64.requires_grad_(True)
    (g64,) = torch.autograd.grad((model64(x64) * proj.double()).sum(), x64)
    cos = float(torch.nn.functional.cosine_similarity(g32.double().flatten(), g64.flatten(), dim=0))
    assert cos > 0.999, f"{name}: float32 vs float64 input-gradient cosine {cos}"


def test_batch_independent() -> None:
    model = load("mobileface")
    x, _ = reference("mobileface")
    batch = torch.cat([x, x.flip(-1), x[:1]])
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(b[None]) for b in batch])
    assert together.shape == (5, 256)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_parameters_frozen_and_gradient_reaches_input() -> None:
    model = load("faceres")
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.full((1, 3, 224, 224), 128.0, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def test_blazeface_back_runs() -> None:
    model = load_graph_model(model_json("blazeface-back"), BLAZEFACE_OUTPUTS)
    x = torch.rand(3, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(3, 512, 1), (3, 384, 1), (3, 512, 16), (3, 384, 16)]
    assert all(bool(torch.isfinite(o).all()) for o in outs)


def test_unknown_output_node() -> None:
    with pytest.raises(TfjsGraphError, match="no node"):
        load_graph_model(model_json("mobileface"), "no/such/node")


# ------------------------------------------------------------ synthetic models: manifest decoding, layouts


def write_model(tmp_path: Path, nodes: list[dict], entries: list[tuple[dict, bytes]]) -> Path:
    """A model.json + one .bin shard holding `entries` (manifest spec, raw bytes) in order."""
    (tmp_path / "m.bin").write_bytes(b"".join(raw for _, raw in entries))
    manifest = [{"paths": ["m.bin"], "weights": [spec for spec, _ in entries]}]
    spec = {"format": "graph-model", "modelTopology": {"node": nodes}, "weightsManifest": manifest}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    return path


def const(name: str) -> dict:
    return {"name": name, "op": "Const", "attr": {}}


def placeholder(rank: int) -> dict:
    return {"name": "x", "op": "Placeholder", "attr": {"shape": {"shape": {"dim": [{"size": "-1"}] * rank}}}}


@pytest.mark.parametrize("quant", ["float32", "float16", "uint8", "uint16"])
def test_manifest_dequantisation(tmp_path: Path, quant: str) -> None:
    w = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    spec = {"name": "w", "shape": [3, 4], "dtype": "float32"}
    if quant == "float32":
        raw, expected = w.tobytes(), w
    elif quant == "float16":
        spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
        raw, expected = w.astype("<f2").tobytes(), w.astype(np.float16).astype(np.float32)
    else:
        levels = 255 if quant == "uint8" else 65535
        lo, scale = float(w.min()), float(w.max() - w.min()) / levels
        q = np.rint((w - lo) / scale).astype("u1" if quant == "uint8" else "<u2")
        spec["quantization"] = {"dtype": quant, "min": lo, "scale": scale, "original_dtype": "float32"}
        raw, expected = q.tobytes(), (q * scale + lo).astype(np.float32)
    bias = np.arange(4, dtype=np.float32)  # after a quantised entry: unaligned offsets must work
    nodes = [placeholder(2), const("w"), const("b"),
             {"name": "y", "op": "_FusedMatMul", "input": ["x", "w", "b"],
              "attr": {"fused_ops": {"list": {"s": ["Qmlhc0FkZA=="]}}}}]
    path = write_model(tmp_path, nodes, [(spec, raw), ({"name": "b", "shape": [4], "dtype": "float32"},
                                                       bias.tobytes())])
    _, consts = load_weights(path)
    np.testing.assert_allclose(consts["w"], expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 3)
    got = load_graph_model(path, "y")(x)
    torch.testing.assert_close(got, x @ torch.from_numpy(expected) + torch.from_numpy(bias))


def test_nhwc_semantics_of_layout_ops(tmp_path: Path) -> None:
    """Pad / Mean / Reshape / ConcatV2 / Softmax see TF's NHWC axes although the module runs NCHW."""
    pads = np.array([[0, 0], [1, 0], [0, 2], [0, 1]], np.int32)  # H, W and channel padding
    entries = [({"name": "p", "shape": [4, 2], "dtype": "int32"}, pads.tobytes()),
               ({"name": "ax", "shape": [], "dtype": "int32"}, np.int32(3).tobytes()),
               ({"name": "red", "shape": [1], "dtype": "int32"}, np.array([2], np.int32).tobytes()),
               ({"name": "shape", "shape": [2], "dtype": "int32"}, np.array([-1, 6], np.int32).tobytes())]
    nodes = [placeholder(4), *[const(n) for n in ("p", "ax", "red", "shape")],
             {"name": "pad", "op": "Pad", "input": ["x", "p"]},
             {"name": "cat", "op": "ConcatV2", "input": ["pad", "pad", "ax"]},
             {"name": "mean", "op": "Mean", "input": ["cat", "red"]},
             {"name": "soft", "op": "Softmax", "input": ["mean"]},
             {"name": "flat", "op": "Reshape", "input": ["soft", "shape"]}]
    path = write_model(tmp_path, nodes, entries)
    x_nhwc = torch.randn(2, 2, 3, 2)
    ref = torch.nn.functional.pad(x_nhwc, (0, 1, 0, 2, 1, 0))
    ref = torch.softmax(torch.cat([ref, ref], 3).mean(2), -1).reshape(-1, 6)
    torch.testing.assert_close(load_graph_model(path, "flat")(x_nhwc.permute(0, 3, 1, 2)), ref)
