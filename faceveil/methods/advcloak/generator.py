"""Trained AdvCloak generators at the user end (§3.2.4): the slim generator file, the ones shipped in
faceveil/data/advcloak/, and the mean of one forward pass over a person's faces (Eq. 2).

Slim file (torch.save): {"format": "faceveil-advcloak-generator", "version", "generator_config", "generator"
(state_dict), "stage" (1: image-specific G^I, 2: person-specific G^II), "subspace", "surrogates", "eps", "steps"}.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from faceveil.errors import FaceveilError
from faceveil.io.atomic import atomic_path
from faceveil.methods.advcloak.networks import GRID, Generator, from_canonical

GENERATOR_FORMAT = "faceveil-advcloak-generator"
VERSION = 1
# Method name -> the generator shipped for it (AdvFaces+ averages the image-specific stage I generator).
PACKAGED = {
    "advcloak": "advcloak-plain.pt",
    "advcloak-affine": "advcloak-affine.pt",
    "advcloak-center": "advcloak-center.pt",
    "advcloak-convex": "advcloak-convex.pt",
    "advfaces-plus": "advcloak-stage1.pt",
}


@dataclass
class TrainedGenerator:
    generator: Generator  # eval mode, frozen
    stage: int
    subspace: str | None
    surrogates: list[str]
    source: str


def export_generator(checkpoint: Path, output: Path, stage: int | None = None) -> dict:
    """Write the slim generator file of a training checkpoint's stage (default: the last finished one)."""
    from faceveil.methods.advcloak.train import read_checkpoint

    data = read_checkpoint(checkpoint)
    finished = [k for k in (2, 1) if data.get(f"stage{k}", {}).get("done")]
    stage = stage or (finished[0] if finished else None)
    if stage is None or stage not in finished:
        raise FaceveilError(f"{checkpoint} has no finished stage {stage or ''}".rstrip())
    state = data[f"stage{stage}"]
    slim = {"format": GENERATOR_FORMAT, "version": VERSION, "generator_config": data["generator_config"],
            "generator": state["generator"], "stage": stage, "subspace": state.get("subspace"),
            "surrogates": list(state["settings"]["surrogates"]), "eps": state["settings"]["eps"],
            "steps": state["step"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as temp:
        torch.save(slim, temp)
    return {**{k: v for k, v in slim.items() if k != "generator"}, "bytes": output.stat().st_size}


def packaged_path(name: str) -> Path:
    """The shipped generator file for a method name (see PACKAGED)."""
    if name not in PACKAGED:
        raise FaceveilError(f"no packaged generator for {name!r}; known: {', '.join(PACKAGED)}")
    path = Path(str(resources.files("faceveil").joinpath(f"data/advcloak/{PACKAGED[name]}")))
    if not path.is_file():
        raise FaceveilError(f"the packaged generator {PACKAGED[name]} is missing from faceveil/data/advcloak "
                            "(reinstall faceveil, or train one with `faceveil train advcloak`)")
    return path


def load_generator(source: str | Path) -> TrainedGenerator:
    """A packaged generator by method name, or a slim / training checkpoint file (its last finished stage)."""
    path = packaged_path(str(source)) if str(source) in PACKAGED else Path(source)
    return _load_cached(str(path.resolve()))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> TrainedGenerator:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise FaceveilError(f"cannot read generator {path}: {' '.join(str(exc).split())[:200]}") from exc
    if isinstance(data, dict) and data.get("format") == "faceveil-advcloak":  # a training checkpoint
        stage = next((k for k in (2, 1) if data.get(f"stage{k}", {}).get("done")), None)
        if stage is None:
            raise FaceveilError(f"{path} has no finished training stage")
        state = data[f"stage{stage}"]
        data = {"generator_config": data["generator_config"], "generator": state["generator"], "stage": stage,
                "subspace": state.get("subspace"), "surrogates": state["settings"]["surrogates"]}
    elif not isinstance(data, dict) or data.get("format") != GENERATOR_FORMAT:
        raise FaceveilError(f"{path} is not an AdvCloak generator file")
    generator = Generator(**data["generator_config"])
    generator.load_state_dict(data["generator"])
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return TrainedGenerator(generator, int(data["stage"]), data.get("subspace"), list(data["surrogates"]), path)


# ------------------------------------------------------------------------------------------------ masks


@torch.no_grad()
def person_mask_grid(generator: Generator, canonical_faces: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Eq. 2: the mean of G over a person's faces [n,3,256,256] (canonical, [0,1]) -> [3,112,112]."""
    total = torch.zeros(3, GRID, GRID)
    for start in range(0, canonical_faces.shape[0], chunk):
        total += generator(from_canonical(canonical_faces[start:start + chunk])).sum(0)
    return total / canonical_faces.shape[0]
