"""What a method is, one contract per kind. The registry (faceveil.methods.registry) names every method and its kind;
the jobs (faceveil.pipeline) and the evaluation protocols call methods only through these contracts.

- image (and end-cloud): `ImageMethod(batch, ensemble, attack) -> Perturbation` — one perturbation per face of the
  batch, in canonical face space, and for targeted methods the target each face was steered to. An end-cloud method
  (APF) has the same contract: its server, not the caller's ensemble and budget, decides the noise.
- person: `PersonLearner(batch, ensemble, attack, options, progress) -> MaskResult` — every face of the batch is one
  person; the result is n_M canonical masks shared by all of that person's photos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from faceveil.attacks.core import AttackConfig, Ensemble
    from faceveil.attacks.faces import FaceBatch

KINDS = ("image", "person", "end-cloud")


@dataclass
class Perturbation:
    """What an image method returns: the canonical perturbation [B,3,256,256], and for targeted methods, per face,
    the target identity chosen at the last iteration (index into the target set, name) and the identity index
    chosen at every iteration ([steps, B])."""

    delta: torch.Tensor
    target_index: list[int] | None = None
    targets: list[str] | None = None
    history: torch.Tensor | None = None

    @property
    def targeted(self) -> bool:
        return self.targets is not None


@dataclass
class MethodOptions:
    """The settings an image or end-cloud method is built with, besides the attack budget: TIP-IM's naturalness
    weight, gain and target count (targeted methods), and APF's server, gradient algorithm, feature offset and probe
    model (end-cloud). A method reads what it needs and ignores the rest."""

    gamma: float = 0.0
    gain: str = "g"  # g | g1 | g2 | rand
    max_targets: int = 10
    best_of_targets: bool = False  # single-target methods: try every target, keep the best (the paper's protocol)
    server: str | None = None
    apf_algorithm: str | None = None  # None: the one the server networks were trained on
    apf_offset: bool = False
    apf_probe: str = "mobileface"
    seed: int = 0


ImageMethod = Callable[["FaceBatch", "Ensemble", "AttackConfig"], Perturbation]


@dataclass
class PersonMaskOptions:
    """The settings of one person's mask learning: how many diverse masks (Eq. 19 of OPOM, with its weight lambda),
    the other identities' faces of a universal mask (fi-uap-all), GAP's epochs and batch, and method-specific extras
    (e.g. AdvCloak's generator file)."""

    masks: int = 1
    diversity_weight: float = 1.0
    universal_faces: FaceBatch | None = None
    gap_epochs: int = 10
    gap_batch: int = 2
    extra: dict = field(default_factory=dict)


class MaskResult(NamedTuple):
    """What a person learner returns: the masks [n_M,3,256,256] and figures about the run (timings, objective)."""

    masks: torch.Tensor
    info: dict


PersonLearner = Callable[["FaceBatch", "Ensemble", "AttackConfig", PersonMaskOptions, bool], MaskResult]
