"""Write faceveil/data/references/ref_dlib.npz: fixed 150x150 inputs and the descriptors the ORIGINAL dlib runtime (C++,
Debian `libdlib-dev` 19.24) computes for them, so that tests/test_loader_dlib.py can check our PyTorch loader
without a C++ toolchain.

    apt-get update && apt-get install -y libdlib-dev libblas-dev liblapack-dev g++ pkg-config  # as root
    .venv/bin/python tools/make_references/make_dlib_reference.py [--build-dir /tmp/faceveil-dlib-ref]

The fixture holds `inputs` (uint8, [3, 150, 150, 3], RGB, exactly what dlib is fed as matrix<rgb_pixel>),
`outputs` (float32, [3, 128]), `model` and `runtime`. Inputs are made here, deterministically: a smooth
pattern, a uniform-random image and a blocky face-like layout with mild noise.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from patterns import smooth_image  # noqa: E402  (beside this script)

from faceveil.io import weights  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXTURE = ROOT / "faceveil" / "data" / "references" / "ref_dlib.npz"
MODEL = "dlib/dlib_face_recognition_resnet_model_v1.dat"
SIDE = 150
SEED = 20240615



def face_like_image(side: int, rng: np.random.Generator) -> np.ndarray:
    """A skin-toned oval with darker eyes and mouth on a grey background, plus mild noise."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64) / side
    img = np.empty((side, side, 3))
    img[:] = (90.0, 100.0, 110.0)
    img[((x - 0.5) / 0.36) ** 2 + ((y - 0.5) / 0.46) ** 2 < 1.0] = (205.0, 160.0, 135.0)
    for cx in (0.36, 0.64):
        img[((x - cx) / 0.07) ** 2 + ((y - 0.42) / 0.035) ** 2 < 1.0] = (40.0, 30.0, 30.0)
    img[((x - 0.5) / 0.14) ** 2 + ((y - 0.74) / 0.035) ** 2 < 1.0] = (150.0, 60.0, 60.0)
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def fixed_inputs(seed: int = SEED) -> np.ndarray:
    """[3, 150, 150, 3] uint8 RGB: smooth pattern, uniform noise, face-like layout."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    return np.stack([smooth_image(SIDE), noise, face_like_image(SIDE, rng)])


def compile_reference(build_dir: Path) -> Path:
    """g++ the C++ reference with the flags pkg-config gives for dlib-1."""
    build_dir.mkdir(parents=True, exist_ok=True)
    exe = build_dir / "dlib_reference"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "dlib-1"], check=True, capture_output=True,
                           text=True).stdout
    cmd = ["g++", "-O2", "-std=c++14", "-o", str(exe), str(HERE / "dlib_reference.cpp"), *shlex.split(flags)]
    print("+", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return exe


def run_reference(exe: Path, inputs: np.ndarray, build_dir: Path) -> np.ndarray:
    """Feed the raw uint8 images to the C++ program; read back [N, 128] float32."""
    raw_in, raw_out = build_dir / "inputs.u8", build_dir / "outputs.f32"
    np.ascontiguousarray(inputs, dtype=np.uint8).tofile(raw_in)
    model = weights.path(MODEL)
    subprocess.run([str(exe), str(model), str(raw_in), str(len(inputs)), str(raw_out)], check=True)
    return np.fromfile(raw_out, dtype="<f4").reshape(len(inputs), 128)


def dlib_version() -> str:
    out = subprocess.run(["pkg-config", "--modversion", "dlib-1"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/faceveil-dlib-ref"),
                        help="where the compiled program and raw files go (outside the repository)")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    inputs = fixed_inputs()
    outputs = run_reference(compile_reference(args.build_dir), inputs, args.build_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runtime = f"dlib {dlib_version()} C++ (Debian libdlib-dev)"
    np.savez_compressed(args.out, inputs=inputs, outputs=outputs.astype(np.float32), model=np.array(MODEL),
                        runtime=np.array(runtime))
    print(f"wrote {args.out}: inputs {inputs.shape} uint8, outputs {outputs.shape} from {runtime}")


if __name__ == "__main__":
    main()
