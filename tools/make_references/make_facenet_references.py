"""Reference outputs of the FaceNet recognisers computed by their ORIGINAL runtime, TensorFlow (CPU).

Writes faceveil/data/references/ref_facenet-vgg.npz (20180402-114759.pb) and ref_facenet-casia.npz
(graph_final.pb). Each holds `inputs` (uint8, [3, 160, 160, 3] RGB), `outputs` (float32, [3, 512]: the graph's
`embeddings`), the normalisation `mean`/`scale` (TensorFlow is fed (inputs - mean) / scale, float32, NHWC),
`model` (the weight file) and `runtime`. facenet-vgg is fed at its `input` Identity with `phase_train` False (the
inference branch: batch-norm moving statistics, no dropout), as FaceNet's own validate_on_lfw does. The casia graph
is also run by OpenCV DNN 4.6 (the runtime it was exported for) and the two runtimes are compared.

Run it in the tool venv, never in the project venv (the runtimes are reference tools, not dependencies):

    python3.11 -m venv .tools-venv
    .tools-venv/bin/pip install tensorflow-cpu==2.21.0 opencv-python-headless==4.6.0.66 "numpy<2"
    .tools-venv/bin/python tools/make_references/make_facenet_references.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from patterns import smooth_image  # noqa: E402  (beside this script)

from faceveil.io.weights import home  # noqa: E402  (stdlib-only module; needs no torch)

FIXTURES = REPO / "faceveil" / "data" / "references"
SIZE = 160
MEAN, SCALE = 127.5, 128.0  # FaceNet's fixed image standardisation (the 2018 models were trained with it)

# name -> (weight file under the cache, feeds besides the image)
MODELS: dict[str, tuple[str, dict[str, bool]]] = {
    "facenet-vgg": ("facenet/20180402-114759.pb", {"phase_train:0": False}),
    "facenet-casia": ("facenet/graph_final.pb", {}),
}


def uniform_noise() -> np.ndarray:
    """Every pixel independent and uniform over 0..255."""
    return np.random.default_rng(20261206).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def drawn_face() -> np.ndarray:
    """A drawn face (skin ellipse, eyes, nose, mouth) with hard edges and saturated pixels (0 and 255) on a striped
    background, plus mild noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) * (112.0 / SIZE)  # laid out in 112-pixel units
    img = np.where(((xx + yy) // 8 % 2 == 0)[..., None], [255.0, 255.0, 255.0], [20.0, 40.0, 90.0])
    img[((xx - 56.0) / 38.0) ** 2 + ((yy - 60.0) / 48.0) ** 2 < 1.0] = [224.0, 172.0, 140.0]
    for cx, cy in ((41.0, 50.0), (71.0, 50.0)):
        img[(xx - cx) ** 2 + ((yy - cy) * 1.8) ** 2 < 30.0] = [0.0, 0.0, 0.0]
    img[(np.abs(xx - 56.0) < 3.0) & (yy > 55.0) & (yy < 70.0)] = [180.0, 120.0, 100.0]
    img[(np.abs(yy - 84.0) < 2.5) & (xx > 43.0) & (xx < 69.0)] = [170.0, 30.0, 40.0]
    img += np.random.default_rng(11).normal(0.0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def test_images() -> np.ndarray:
    return np.stack([smooth_image(SIZE), uniform_noise(), drawn_face()])


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NHWC, computed in float32 exactly as the registry does."""
    return (images.astype(np.float32) - np.float32(MEAN)) / np.float32(SCALE)


def run_tensorflow(model: Path, images: np.ndarray, feeds: dict[str, bool]) -> tuple[np.ndarray, str]:
    """The frozen graph in a TF 1.x session, one image per run (the casia graph fixes batch 1)."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(model.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    x = normalise(images)
    with tf.compat.v1.Session(graph=graph) as session:
        outputs = [session.run("embeddings:0", {"input:0": x[i:i + 1], **feeds})[0] for i in range(len(x))]
    return np.stack(outputs).astype(np.float32), f"tensorflow-cpu {tf.__version__}"


def run_opencv(model: Path, images: np.ndarray) -> tuple[np.ndarray, str]:
    import cv2

    net = cv2.dnn.readNetFromTensorflow(str(model))
    x = normalise(images).transpose(0, 3, 1, 2)
    outputs = []
    for i in range(len(x)):  # one at a time: the graph's flatten hard-codes batch 1
        net.setInput(np.ascontiguousarray(x[i:i + 1]))
        outputs.append(net.forward("embeddings")[0])
    return np.stack(outputs).astype(np.float32), f"opencv-python-headless {cv2.__version__}"


def write(name: str, model: Path, images: np.ndarray, outputs: np.ndarray, runtime: str) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"ref_{name}.npz"
    np.savez_compressed(path, inputs=images, outputs=outputs, mean=np.float32(MEAN), scale=np.float32(SCALE),
                        model=np.array(f"{model.parent.name}/{model.name}"), runtime=np.array(runtime))
    print(f"{path.relative_to(REPO)}: outputs {outputs.shape}, max |y| {np.abs(outputs).max():.4g} ({runtime})")


def main() -> None:
    images = test_images()
    for name, (relative, feeds) in MODELS.items():
        model = home() / relative
        if not model.is_file():
            sys.exit(f"missing {model}: run `faceveil models fetch` first")
        outputs, runtime = run_tensorflow(model, images, feeds)
        write(name, model, images, outputs, runtime)
        if name == "facenet-casia":
            other, other_runtime = run_opencv(model, images)
            print(f"  {other_runtime} vs TensorFlow: max abs diff {np.abs(other - outputs).max():.3g}")


if __name__ == "__main__":
    main()
