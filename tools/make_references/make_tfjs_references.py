"""Write faceveil/data/references/ref_<model>.npz: fixed inputs and the outputs of the ORIGINAL runtime (TF.js 4.22.0,
pure-JS CPU backend), so that tests/test_loader_tfjs.py checks our PyTorch loader without node.

    npm install --prefix tools/make_references      # once: @tensorflow/tfjs 4.22.0 (node_modules git-ignored)
    .venv/bin/python tools/make_references/make_tfjs_references.py [--models mobileface faceres faceres-deep]

Each fixture holds `inputs` (uint8, NHWC: the exact values TF.js is fed, as float32), `outputs` (float32,
[2, D]), `node`, `model` and `runtime`. Inputs are made here, deterministically: one smooth pattern and one
uniform-random image. Weights come from $FACEVEIL_HOME (default ~/.cache/faceveil).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from patterns import smooth_image  # noqa: E402  (beside this script)

from faceveil.io import weights  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXTURES = ROOT / "faceveil" / "data" / "references"
RUNTIME = "@tensorflow/tfjs 4.22.0 (cpu backend)"

# model -> (weights path under the cache, output node, input side)
MODELS: dict[str, tuple[str, str, int]] = {
    "mobileface": ("human/mobileface.json", "batchnorm0/add_1", 112),
    "faceres": ("human/faceres.json", "global_pooling/Mean", 224),
    "faceres-deep": ("human/faceres-deep.json", "global_pooling/Mean", 224),
}



def fixed_inputs(side: int, seed: int) -> np.ndarray:
    """[2, side, side, 3] uint8, NHWC: the smooth pattern and a uniform-random image."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return np.stack([smooth_image(side), noise])


def run_node(jobs: list[dict]) -> None:
    """Run the TF.js script on a list of jobs (see tfjs_reference.mjs)."""
    if not (HERE / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        sys.exit(f"missing node_modules: run `npm install --prefix {HERE.relative_to(ROOT)}` first")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"jobs": jobs}, f)
    subprocess.run(["node", str(HERE / "tfjs_reference.mjs"), f.name], check=True, cwd=HERE)
    Path(f.name).unlink()


def read_result(path: Path) -> np.ndarray:
    """Raw float32 output written by node, reshaped by its sidecar json."""
    meta = json.loads(Path(f"{path}.json").read_text())
    return np.fromfile(path, dtype="<f4").reshape(meta["shape"])


def make(models: list[str], out_dir: Path) -> None:
    """Make inputs, run TF.js on them, write one fixture per model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs, inputs = [], {}
        for i, name in enumerate(models):
            rel, node, side = MODELS[name]
            inputs[name] = fixed_inputs(side, seed=1000 + i)
            src = Path(tmp) / f"{name}.in.f32"
            inputs[name].astype("<f4").tofile(src)
            jobs.append({"model": str(weights.path(rel)), "output": node, "input": str(src),
                         "shape": list(inputs[name].shape), "result": str(Path(tmp) / f"{name}.out.f32")})
        run_node(jobs)
        for name, job in zip(models, jobs, strict=True):
            out = read_result(Path(job["result"])).astype(np.float32)
            dest = out_dir / f"ref_{name}.npz"
            np.savez_compressed(dest, inputs=inputs[name], outputs=out, node=np.array(job["output"]),
                                model=np.array(name), runtime=np.array(RUNTIME))
            print(f"{dest}: outputs {out.shape}, max |out| {np.abs(out).max():.4g}, "
                  f"{dest.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    make(args.models, args.out)


if __name__ == "__main__":
    main()
