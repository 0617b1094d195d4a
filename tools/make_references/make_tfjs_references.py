"""Write faceveil/data/references/ref_<model>.npz: fixed inputs and the outputs of the ORIGINAL runtime (TF.js 4.22.0,
pure-JS CPU backend), so that tests/test_loader_tfjs.py checks our PyTorch loader without node.

    npm install --prefix tools/make_references      # once: @tensorflow/tfjs 4.22.0 (node_modules git-ignored)
    .venv/bin/python tools/make_references/make_tfjs_references.py [--models mobileface ... blazeface-back]

Each fixture holds `inputs` (uint8, NHWC), `outputs` (float32), `node`, `model` and `runtime`. The recognisers are
fed the uint8 values as float32 (their graphs normalise) and give [2, D]. BlazeFace is fed x / 127.5 - 1 (float32,
as Human feeds it) and its four output nodes (comma-separated in `node`) are joined per anchor as Human joins them:
[2, 896, 17] = the logit, then the 16 regressors, the 512 stride-16 anchors first. Inputs are made here,
deterministically: one smooth pattern and one uniform-random image. Weights come from $FACEVEIL_HOME (default
~/.cache/faceveil).
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

# model -> (weights path under the cache, output node(s), input side)
MODELS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "mobileface": ("human/mobileface.json", ("batchnorm0/add_1",), 112),
    "faceres": ("human/faceres.json", ("global_pooling/Mean",), 224),
    "faceres-deep": ("human/faceres-deep.json", ("global_pooling/Mean",), 224),
    "blazeface-back": ("human/blazeface-back.json", ("Identity", "Identity_1", "Identity_2", "Identity_3"), 256),
}
NORMALISED_FEED = {"blazeface-back"}  # fed x / 127.5 - 1 (the others: the pixel values)


def feed(name: str, pixels: np.ndarray) -> np.ndarray:
    """The float32 values TF.js is fed for these uint8 pixels."""
    values = pixels.astype(np.float32)
    return values / np.float32(127.5) - np.float32(1.0) if name in NORMALISED_FEED else values


def joined(name: str, outs: list[np.ndarray]) -> np.ndarray:
    """One output array per model: the node's, or BlazeFace's four joined per anchor (logit, then regressors)."""
    if len(outs) == 1:
        return outs[0]
    logits512, logits384, reg512, reg384 = outs
    return np.concatenate([np.concatenate([logits512, reg512], axis=2), np.concatenate([logits384, reg384], axis=2)],
                          axis=1)


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
        for name in models:
            rel, nodes, side = MODELS[name]
            inputs[name] = fixed_inputs(side, seed=1000 + list(MODELS).index(name))  # a model's inputs never change
            for i, image in enumerate(feed(name, inputs[name])):  # one image a job: BlazeFace's graph has batch 1
                src = Path(tmp) / f"{name}.{i}.in.f32"
                image[None].astype("<f4").tofile(src)
                jobs += [{"model": str(weights.path(rel)), "output": node, "input": str(src),
                          "shape": [1, *image.shape], "result": str(Path(tmp) / f"{name}.{i}.{k}.out.f32")}
                         for k, node in enumerate(nodes)]
        run_node(jobs)
        for name in models:
            nodes = MODELS[name][1]
            per_image = [joined(name, [read_result(Path(tmp) / f"{name}.{i}.{k}.out.f32").astype(np.float32)
                                       for k in range(len(nodes))]) for i in range(len(inputs[name]))]
            out = np.concatenate(per_image)
            dest = out_dir / f"ref_{name}.npz"
            np.savez_compressed(dest, inputs=inputs[name], outputs=out, node=np.array(",".join(nodes)),
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
