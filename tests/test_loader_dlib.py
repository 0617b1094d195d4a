"""The dlib `.dat` loader against the ORIGINAL runtime (dlib 19.24 C++), through the committed fixture
faceveil/data/references/ref_dlib.npz (made by tools/make_references/make_dlib_reference.py; no C++ needed here), and
its input gradients against finite differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from faceveil.io import weights
from faceveil.models.loaders.dlib_dat import DlibFormatError, load_dlib_resnet, parse_dlib_resnet

MODEL = weights.home() / "dlib" / "dlib_face_recognition_resnet_model_v1.dat"
FIXTURE = Path(__file__).parents[1] / "faceveil" / "data" / "references" / "ref_dlib.npz"

needs_model = pytest.mark.skipif(
    not MODEL.is_file(), reason=f"dlib weight file {MODEL} missing: run ./setup.sh or `faceveil models fetch`"
)


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, np.ndarray]:
    data = np.load(FIXTURE)
    inputs = torch.from_numpy(data["inputs"]).permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW float 0..255
    return inputs, data["outputs"]


@needs_model
@pytest.mark.parametrize("fast", [True, False], ids=["folded-channels-last", "as-dlib"])
@pytest.mark.slow
def test_matches_dlib_cpp(reference: tuple[torch.Tensor, np.ndarray], fast: bool) -> None:
    inputs, expected = reference
    model = load_dlib_resnet(MODEL, fold=fast, channels_last=fast)
    with torch.no_grad():
        got = model(inputs).numpy()
    assert got.shape == expected.shape == (3, 128)
    diff = float(np.abs(got - expected).max())
    bound = 1e-4 * float(np.abs(expected).max())
    assert diff <= bound, f"max abs diff to dlib C++ {diff:.3g} > {bound:.3g}"
    print(f"dlib fold/channels_last={fast}: max abs diff {diff:.3g} (bound {bound:.3g})")


@needs_model
@pytest.mark.slow
def test_batch_of_one_agrees_with_batch(reference: tuple[torch.Tensor, np.ndarray]) -> None:
    inputs, _ = reference
    model = load_dlib_resnet(MODEL)
    with torch.no_grad():
        batch = model(inputs)
        single = torch.cat([model(inputs[i:i + 1]) for i in range(len(inputs))])
    assert torch.allclose(batch, single, atol=1e-6)


@needs_model
@pytest.mark.slow
def test_input_gradient_matches_finite_differences(reference: tuple[torch.Tensor, np.ndarray]) -> None:
    inputs, _ = reference
    model = load_dlib_resnet(MODEL).double()
    x = inputs[2:3].double().requires_grad_(True)  # the face-like image, batch 1
    readout = torch.Generator().manual_seed(0)
    w = torch.randn(1, 128, generator=readout, dtype=torch.float64)
    (grad,) = torch.autograd.grad((model(x) * w).sum(), x)
    rng = torch.Generator().manual_seed(1)
    # Tiny step (pixel units, 0..255): the net is piecewise linear (relu, max-pool), so a larger step crosses
    # kinks and FD drifts by ~1e-2; in float64 a 1e-6 step leaves rounding near 1e-9.
    h = 1e-6
    for _ in range(3):
        v = torch.randn(x.shape, generator=rng, dtype=torch.float64)
        with torch.no_grad():
            numeric = ((model(x + h * v) * w).sum() - (model(x - h * v) * w).sum()) / (2 * h)
        analytic = (grad * v).sum()
        rel = abs(float(numeric - analytic)) / max(abs(float(numeric)), 1e-12)
        assert rel < 1e-4, f"directional derivative: autograd {float(analytic):.6g}, FD {float(numeric):.6g}"


def test_rejects_a_file_that_is_not_dlib(tmp_path: Path) -> None:
    with pytest.raises(DlibFormatError):
        parse_dlib_resnet(b"\x01\x01\x05hello")
    with pytest.raises(DlibFormatError):
        load_dlib_resnet(tmp_path / "missing.dat")
