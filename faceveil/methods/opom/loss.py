"""OPOM's objectives (Zhong & Deng, TPAMI 2022, §3.2-3.3 and Eq. 19): the distance of a masked face's features from
the person's feature subspace (convex hull, affine hull, class centre) or from its own clean features (FI-UAP), the
mask-to-mask diversity term of Eq. 19, and GD-UAP's activation norms. See faceveil.methods.opom for the equations."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from faceveil.attacks.core import Embeddings, Ensemble, is_conv, on_cosine_scale, weighted_sum
from faceveil.attacks.faces import FaceBatch
from faceveil.attacks.subspace import convex_hull_distance, point_distance, subspace_distance

# Eq. 19 puts the subspace distances and the mask-to-mask distance against one threshold: equal weights.
DEFAULT_DIVERSITY_WEIGHT = 1.0


@dataclass(frozen=True)
class Layout:
    """n_M masks x n_k faces as one batch, mask-major: entry m * n_k + i is face i under mask m."""

    faces: int
    masks: int

    @property
    def face_index(self) -> torch.Tensor:
        return torch.arange(self.faces).repeat(self.masks)

    @property
    def owner(self) -> torch.Tensor:
        return torch.arange(self.masks).repeat_interleave(self.faces)

    def expand(self, batch: FaceBatch) -> FaceBatch:
        return batch if self.masks == 1 else batch.take(self.face_index)


# The subspace models of §3.2.1 (method -> faceveil.attacks.subspace's name) and the FI-UAP family of §3.3.2.
SUBSPACE_OF = {"opom-convex": "convex", "opom-affine": "affine", "opom-center": "center"}
SUBSPACE_METHODS = (*SUBSPACE_OF, "fi-uap", "fi-uap-plus", "fi-uap-all")


class PersonLoss:
    """J per batch entry (larger = further from the person), for one method; call it with the surrogates'
    embeddings of the masked faces. The convex hull's coefficients are kept between calls to warm-start the
    solver (Algorithm 2, line 3, re-solved at every step), and its time is counted."""

    def __init__(self, method: str, ensemble: Ensemble, clean: Embeddings, layout: Layout,
                 diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
                 activations: ActivationRecorder | None = None):
        if method not in (*SUBSPACE_METHODS, "gd-uap"):
            raise ValueError(f"no loss for method {method!r}")
        if method == "gd-uap" and activations is None:
            raise ValueError("gd-uap needs an ActivationRecorder")
        self.method, self.ensemble, self.clean, self.layout = method, ensemble, clean, layout
        self.diversity_weight = diversity_weight
        self.activations = activations
        self.alpha: dict[str, torch.Tensor] = {}
        self.hull_seconds = 0.0
        self.hull_calls = 0
        if method == "opom-convex":
            _warm_up_hull_solver()

    def __call__(self, emb: Embeddings, _step: int = 0) -> torch.Tensor:
        return weighted_sum(self.ensemble, lambda name: self.model_term(name, emb[name]))

    def model_term(self, name: str, queries: torch.Tensor) -> torch.Tensor:
        """J of one surrogate: its identity (or GD-UAP activation) term, plus the masks' diversity term."""
        metric = self.ensemble.metric(name)
        term = self.identity_term(name, queries, metric) if self.method != "gd-uap" else self.activation_term(name)
        if self.layout.masks > 1 and self.diversity_weight > 0:
            term = term + self.diversity_weight * self.diversity_term(queries, metric)
        return term

    def objective(self, emb: Embeddings, step: int) -> torch.Tensor:
        """What the core minimises: -J per entry."""
        return -self(emb, step)

    def identity_term(self, name: str, queries: torch.Tensor, metric: str) -> torch.Tensor:
        """Distance of each masked face from the person (on the cosine scale): raw features for an L2 model, whose
        embeddings are not centred, normalised ones otherwise."""
        members, unit = self.clean[name], metric != "l2"
        if self.method in SUBSPACE_OF:
            distance = self.subspace_term(name, queries, members, unit)
        elif self.method == "fi-uap-plus":
            distance = point_distance(queries[:, None], members[None], unit).mean(-1)
        else:  # fi-uap, fi-uap-all: each masked image against its own clean feature
            distance = point_distance(queries, members[self.layout.face_index], unit)
        return on_cosine_scale(distance, metric)

    def subspace_term(self, name: str, queries: torch.Tensor, members: torch.Tensor, unit: bool) -> torch.Tensor:
        """Distance to the person's subspace; the convex hull is warm-started from its last solution and timed."""
        subspace = SUBSPACE_OF[self.method]
        start = time.perf_counter()
        found = subspace_distance(queries, members, subspace, normalise=unit, alpha_init=self.alpha.get(name))
        if found.alpha is not None:
            self.hull_seconds += time.perf_counter() - start
            self.hull_calls += 1
            self.alpha[name] = found.alpha
        return found.distance

    def diversity_term(self, queries: torch.Tensor, metric: str) -> torch.Tensor:
        """Per entry (m, i): mean over the other masks m' of ||f(X_i + Delta_m) - f(X_i + Delta_m')|| (Eq. 19)."""
        n_m, n_k = self.layout.masks, self.layout.faces
        per_mask = queries.reshape(n_m, n_k, -1)
        pairwise = point_distance(per_mask[:, None], per_mask[None], metric != "l2")  # [n_M, n_M, n_k]
        spread = pairwise.sum(1) / (n_m - 1)  # the diagonal is 0
        return on_cosine_scale(spread, metric).reshape(-1)

    def activation_term(self, name: str) -> torch.Tensor:
        """GD-UAP (Eq. 16): sum over layers of log ||l_j(X_i + Delta)|| per entry, from the recorded forward pass."""
        assert self.activations is not None
        return self.activations.log_norms(name)

    @property
    def hull_ms_per_step(self) -> float | None:
        if not self.hull_calls:
            return None
        return 1e3 * self.hull_seconds / self.hull_calls * len(self.ensemble.names)


@functools.cache
def _warm_up_hull_solver() -> None:
    """The first linear solve of a process loads LAPACK (~1 s, once): do it before the solver is timed."""
    convex_hull_distance(torch.ones(1, 2), torch.eye(2))


# ----------------------------------------------------------------------------------------------- GD-UAP layers

# The activations GD-UAP maximises: after each non-linearity (ReLU / PReLU modules, including the TF.js loader's
# own PReLU module) and, for ResNets whose non-linearities are functional, after each residual block (dlib).
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.LeakyReLU)
_ACTIVATION_NAMES = ("_PRelu", "ResidualUnit")


def activation_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules()
              if isinstance(m, _ACTIVATION_MODULES) or type(m).__name__ in _ACTIVATION_NAMES]
    if not layers:
        layers = [m for m in model.modules() if is_conv(m)]  # no activation modules: the conv outputs
    return layers


class ActivationRecorder:
    """Forward hooks on each surrogate's activation layers, active inside `recording()`; `log_norms(name)` turns
    the last forward pass of that model into sum_j log ||l_j|| per sample and clears it."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in ensemble.names}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        for name, model in self.ensemble.models.items():
            for layer in activation_layers(model):
                handles.append(layer.register_forward_hook(self._hook(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for outputs in self.outputs.values():
                outputs.clear()

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name].append(output)
        return hook

    def log_norms(self, name: str) -> torch.Tensor:
        outputs, self.outputs[name] = self.outputs[name], []
        if not outputs:
            raise RuntimeError(f"no activations recorded for {name}")
        norms = [o.flatten(1).norm(dim=1).clamp_min(1e-12).log() for o in outputs]
        return torch.stack(norms).sum(0)


