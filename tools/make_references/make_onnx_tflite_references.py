"""Reference outputs of mfn512 (ONNX) and mfn192 (TFLite) computed by their ORIGINAL runtimes.

Writes faceveil/data/references/ref_mfn512.npz (onnxruntime) and ref_mfn192.npz (TensorFlow Lite). Each
holds `inputs` (uint8, [3, 112, 112, 3] RGB), `outputs` (float32, [3, D]), the normalisation `mean`/`scale`
(the runtime is fed (inputs - mean) / scale, float32), `model` (the weight file) and `runtime` (name and
version of what computed the outputs). Inputs are made here, deterministically: a smooth pattern, a
uniform-random image and a drawn face with hard edges.

Run it in the tool venv, never in the project venv (the runtimes are reference tools, not dependencies):

    python3.11 -m venv .tools-venv
    .tools-venv/bin/pip install ai-edge-litert==2.3.0 onnxruntime==1.31.1 numpy
    .tools-venv/bin/python tools/make_references/make_onnx_tflite_references.py

`tensorflow-cpu` (tf.lite.Interpreter) or `tflite-runtime` work too when ai-edge-litert is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from faceveil.io.weights import home  # noqa: E402  (stdlib-only module; needs no torch)

FIXTURES = REPO / "faceveil" / "data" / "references"
SIZE = 112


def smooth_pattern() -> np.ndarray:
    """Slow colour gradients and sinusoids: a smooth, natural-image-like input."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1)
    red = 0.5 + 0.45 * np.sin(2.0 * np.pi * (0.8 * xx + 0.3 * yy))
    green = 0.5 + 0.45 * np.cos(2.0 * np.pi * (0.5 * yy - 0.4 * xx) + 0.7)
    blue = 0.2 + 0.6 * xx * yy
    return np.round(255.0 * np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def uniform_noise() -> np.ndarray:
    """Every pixel independent and uniform over 0..255."""
    return np.random.default_rng(20240611).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def cartoon_face() -> np.ndarray:
    """A drawn face (skin ellipse, eyes, nose, mouth at the ArcFace template points) with hard edges and
    saturated pixels (0 and 255) on a striped background, plus mild noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    img = np.where(((xx + yy) // 8 % 2 == 0)[..., None], [255.0, 255.0, 255.0], [20.0, 40.0, 90.0])
    face = ((xx - 56.0) / 38.0) ** 2 + ((yy - 66.0) / 50.0) ** 2 < 1.0
    img[face] = [224.0, 172.0, 140.0]
    for cx, cy in ((38.3, 51.7), (73.5, 51.5)):
        img[(xx - cx) ** 2 + ((yy - cy) * 1.8) ** 2 < 36.0] = [0.0, 0.0, 0.0]
    img[(np.abs(xx - 56.0) < 3.0) & (yy > 58.0) & (yy < 73.0)] = [180.0, 120.0, 100.0]
    img[(np.abs(yy - 92.0) < 2.5) & (xx > 41.0) & (xx < 71.0)] = [170.0, 30.0, 40.0]
    img += np.random.default_rng(7).normal(0.0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def test_images() -> np.ndarray:
    return np.stack([smooth_pattern(), uniform_noise(), cartoon_face()])


def normalise(images: np.ndarray, mean: float, scale: float) -> np.ndarray:
    """uint8 NHWC -> float32 NHWC, computed in float32 exactly as the tests do."""
    return (images.astype(np.float32) - np.float32(mean)) / np.float32(scale)


def run_onnxruntime(model: Path, images: np.ndarray) -> tuple[np.ndarray, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = normalise(images, 127.0, 128.0).transpose(0, 3, 1, 2)
    outputs = [session.run(None, {name: x[i : i + 1]})[0][0] for i in range(len(x))]  # the file fixes batch 1
    return np.stack(outputs).astype(np.float32), f"onnxruntime {ort.__version__}"


def _tflite_interpreter(model: Path, reference_kernels: bool = False):
    """An interpreter from ai-edge-litert, else tflite-runtime, else tensorflow; and its name + version."""
    try:
        import ai_edge_litert as pkg
        from ai_edge_litert import interpreter as lite
    except ImportError:
        try:
            import tflite_runtime as pkg
            from tflite_runtime import interpreter as lite
        except ImportError:
            import tensorflow as pkg

            lite = pkg.lite
    resolver = getattr(lite, "OpResolverType", None) or lite.experimental.OpResolverType
    kwargs = {"experimental_op_resolver_type": resolver.BUILTIN_REF} if reference_kernels else {}
    interp = lite.Interpreter(model_path=str(model), num_threads=1, **kwargs)
    return interp, f"{pkg.__name__} {getattr(pkg, '__version__', '?')}"


def _run_batch(interp, x: np.ndarray) -> np.ndarray:
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()


def run_tflite(model: Path, images: np.ndarray, reference_kernels: bool = False) -> tuple[np.ndarray, str]:
    """Feed the images in the file's fixed batch size, cycling partners; check each image's output is the same
    whatever its partners are."""
    interp, name = _tflite_interpreter(model, reference_kernels)
    interp.allocate_tensors()
    batch = int(interp.get_input_details()[0]["shape"][0])
    x = normalise(images, 127.5, 128.0)
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(x))}
    for start in range(len(x)):
        members = [(start + k) % len(x) for k in range(batch)]
        out = _run_batch(interp, x[members])
        for k, i in enumerate(members):
            results[i].append(out[k])
    spread = max(float(np.abs(r - rs[0]).max()) for rs in results.values() for r in rs)
    if spread != 0.0:
        print(f"  note: an image's output changes with its batch partners by up to {spread:.3g}")
    kernels = "reference kernels" if reference_kernels else "default kernels (XNNPACK)"
    return np.stack([results[i][0] for i in range(len(x))]).astype(np.float32), f"{name}, {kernels}"


def write(name: str, model: Path, images: np.ndarray, outputs: np.ndarray, mean: float, scale: float,
          runtime: str) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"ref_{name}.npz"
    np.savez_compressed(path, inputs=images, outputs=outputs, mean=np.float32(mean), scale=np.float32(scale),
                        model=np.array(f"{model.parent.name}/{model.name}"), runtime=np.array(runtime))
    peak = np.abs(outputs).max()
    print(f"{path.relative_to(REPO)}: outputs {outputs.shape}, max |y| {peak:.4g} ({runtime})")


def main() -> None:
    images = test_images()
    onnx_model = home() / "onnx" / "fr_feature.onnx"
    tflite_model = home() / "tflite" / "MobileFaceNet.tflite"
    for model in (onnx_model, tflite_model):
        if not model.is_file():
            sys.exit(f"missing {model}: run `faceveil models fetch` first")
    outputs, runtime = run_onnxruntime(onnx_model, images)
    write("mfn512", onnx_model, images, outputs, 127.0, 128.0, runtime)
    outputs, runtime = run_tflite(tflite_model, images)
    reference, _ = run_tflite(tflite_model, images, reference_kernels=True)
    print(f"  TFLite default vs reference kernels: max abs diff {np.abs(outputs - reference).max():.3g}")
    write("mfn192", tflite_model, images, outputs, 127.5, 128.0, runtime)


if __name__ == "__main__":
    main()
