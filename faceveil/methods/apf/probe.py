"""APF, the client side (apf-mm2020 §3.3): the image-specific gradient g of a face, computed on the user's device
with the small probe model only, on the common grid (faceveil.methods.apf.networks.APF_GRID).

What g is. Eq. 1 defines g for FGSM: g = eps * sign(grad_x L(x, x_e)), with L = -d(f(x), f(x_e)) (Eq. 2), i.e. one
step that increases the feature distance to the enrolled face. For the iterative algorithms the paper says only that
they "lead to g with different levels of intensity under the same maximum perturbation" and that APF_g is the image
"based on the naive gradient g": the adversarial image is x + g. So for every algorithm g = x_adv - x, the probe's
accumulated perturbation after its iterations, projected onto the eps-ball: for FGSM that is exactly Eq. 1, for the
iterative ones it is what x + g needs to be the algorithm's adversarial example (APF_g). It is what the client
sends; the server maps it to the noise s. All five algorithms are the attack core's loop (faceveil.attacks.core
.run_attack) with the paper's settings (§4.1): step 2/255, 30 iterations, momentum decay 1, DI with rescaling,
rotation and colour conversion at p = 0.5; the perturbation is optimised directly on the grid (GridFaceBatch).

The enrolled face x_e. In the paper's protocol x_e is the other image of a positive pair (`enrolled=`). A user
protecting their own photo has no enrolled image: x_e = x, pushing the face away from its own clean features. The
distance then has a zero gradient at x itself (it is a minimum), so in that case the iterations start from a seeded
random point within one step of x (as R+FGSM, Tramer et al. 2018, does for FGSM); with the Eq. 13 offset the
reference already differs from f(x) and no random start is needed.

The offset delta (Eq. 13): a random vector with 10 % of its elements ~ U(-0.07, 0.07), the rest 0, added to the
enrolled face's (unit-normalised) feature. It is seeded by the seed AND the face's pixels, so two photos of one
person get different offsets (the point of Eq. 13: adversarial images of one subject must not share one direction)
while the same photo with the same seed gives the same g.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from faceveil.attacks.core import AttackConfig, Embeddings, Ensemble, clean_embeddings, ensemble_distance, run_attack
from faceveil.attacks.diversity import APF_DI_TRANSFORMS
from faceveil.attacks.faces import FaceBatch, Regions
from faceveil.errors import FaceveilError
from faceveil.methods.apf.networks import APF_GRID, ApfServerModel, canonical_from_grid
from faceveil.methods.base import ImageMethod, MethodOptions, Perturbation

GRADIENT_ALGORITHMS = ("fgsm", "i-fgsm", "mi-fgsm", "di2-fgsm", "m-di2-fgsm")
STAGES = ("g", "g_hat", "s")  # APF_g, APF_g_hat, APF_s
OFFSET_FRACTION = 0.1  # Eq. 13: 10 % of the elements of delta are non-zero ...
OFFSET_BOUND = 0.07  # ... uniform in (-0.07, 0.07)


@dataclass
class ApfClientConfig:
    algorithm: str = "m-di2-fgsm"
    eps: float = 8 / 255  # L-inf budget (§4.1: 8 of 255)
    step: float = 2 / 255  # step size of the iterative algorithms (§4.1: 2)
    iterations: int = 30  # §4.1
    diversity: float = 0.5  # probability of each DI transform (§4.1)
    momentum: float = 1.0  # decay factor of MI-FGSM (§4.1)
    offset: bool = False  # the random feature offset delta of Eq. 13
    seed: int = 0
    probe: str = "mobileface"

    def validate(self) -> ApfClientConfig:
        if self.algorithm not in GRADIENT_ALGORITHMS:
            raise FaceveilError(f"unknown APF gradient algorithm {self.algorithm!r}; known: "
                                f"{', '.join(GRADIENT_ALGORITHMS)}")
        if not 0 < self.eps <= 1 or self.step <= 0 or self.iterations < 1 or not 0 <= self.diversity <= 1:
            raise FaceveilError("APF client settings out of range: 0 < eps <= 1, step > 0, iterations >= 1, "
                                "0 <= diversity <= 1")
        return self


def attack_config(cfg: ApfClientConfig) -> AttackConfig:
    """The attack core's settings for one of the five gradient algorithms."""
    cfg.validate()
    if cfg.algorithm == "fgsm":  # one step of size eps: Eq. 1
        return AttackConfig(eps=cfg.eps, alpha=cfg.eps, steps=1, seed=cfg.seed)
    momentum = cfg.momentum if cfg.algorithm in ("mi-fgsm", "m-di2-fgsm") else 0.0
    diversity = cfg.diversity if cfg.algorithm in ("di2-fgsm", "m-di2-fgsm") else 0.0
    return AttackConfig(eps=cfg.eps, alpha=cfg.step, steps=cfg.iterations, momentum=momentum, diversity=diversity,
                        diversity_transforms=APF_DI_TRANSFORMS, seed=cfg.seed)


@dataclass
class GridFaceBatch(FaceBatch):
    """A FaceBatch whose perturbations live on APF_GRID: upsampled to canonical space before pasting, so the attack
    core optimises the grid values themselves."""

    def perturbed(self, delta: torch.Tensor) -> torch.Tensor:
        return super().perturbed(canonical_from_grid(delta))

    def pasted(self, delta: torch.Tensor) -> Regions:
        return super().pasted(canonical_from_grid(delta))

    def take(self, index: torch.Tensor) -> GridFaceBatch:
        return on_grid(super().take(index))


def on_grid(batch: FaceBatch) -> GridFaceBatch:
    if isinstance(batch, GridFaceBatch):
        return batch
    return GridFaceBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(FaceBatch) if f.init})


def to_canonical(noise: torch.Tensor) -> torch.Tensor:
    """Grid noise [B,3,S,S] -> canonical-space noise [B,3,256,256], ready for faceveil.detect.canonical.paste."""
    if noise.dim() != 4 or tuple(noise.shape[1:]) != (3, APF_GRID, APF_GRID):
        raise FaceveilError(f"APF noise is [B, 3, {APF_GRID}, {APF_GRID}], got {tuple(noise.shape)}")
    return canonical_from_grid(noise)


def _face_seed(seed: int, region: torch.Tensor) -> int:
    """A seed from the run's seed and a face's 8-bit pixels: same photo + seed -> same value, photos differ."""
    pixels = (region.detach().clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256(np.int64(seed).tobytes() + pixels).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def feature_offsets(batch: FaceBatch, dims: dict[str, int], seed: int) -> Embeddings:
    """Eq. 13's delta for every face and model [B, D]: OFFSET_FRACTION of the elements ~ U(-bound, bound)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in dims}
    for i in range(len(batch)):
        gen = torch.Generator().manual_seed(_face_seed(seed, batch.regions[i]))
        for name in sorted(dims):
            values = (torch.rand(dims[name], generator=gen) * 2 - 1) * OFFSET_BOUND
            keep = torch.rand(dims[name], generator=gen) < OFFSET_FRACTION
            out[name].append(values * keep)
    return {name: torch.stack(rows) for name, rows in out.items()}


def reference_embeddings(batch: FaceBatch, ensemble: Ensemble, enrolled: FaceBatch | None,
                         offset: bool, seed: int) -> Embeddings:
    """f(x_e) for each model (x_e = x itself without `enrolled`), plus delta (Eq. 13) when `offset`. With the
    offset, cosine models' features are unit-normalised first, so delta's scale means the same for every model."""
    reference = clean_embeddings(enrolled if enrolled is not None else batch, ensemble)
    if not offset:
        return reference
    deltas = feature_offsets(batch, {n: e.shape[-1] for n, e in reference.items()}, seed)
    return {n: (e if ensemble.metric(n) == "l2" else F.normalize(e, dim=-1)) + deltas[n]
            for n, e in reference.items()}


def adversarial_noise(batch: FaceBatch, ensemble: Ensemble, cfg: ApfClientConfig,
                      enrolled: FaceBatch | None = None, progress: bool = False) -> torch.Tensor:
    """The algorithm of `cfg` against `ensemble`: x_adv - x on the grid [B,3,S,S], within eps. On the probe this
    is the client's g; on the server models it is their gradient g~ (Eq. 5) or the 'original image accessible'
    baseline. Loss: Eq. 2 (Eq. 13 with the offset), the distance being the core's ensemble feature distance."""
    if enrolled is not None and len(enrolled) != len(batch):
        raise FaceveilError(f"{len(batch)} faces but {len(enrolled)} enrolled faces")
    acfg = attack_config(cfg)
    grid = on_grid(batch)
    reference = reference_embeddings(grid, ensemble, enrolled, cfg.offset, cfg.seed)
    start = None
    if enrolled is None and not cfg.offset:  # x_e = x: step off the distance's minimum (see module docstring)
        gen = torch.Generator().manual_seed(cfg.seed)
        start = (torch.rand(len(batch), 3, APF_GRID, APF_GRID, generator=gen) * 2 - 1) * min(cfg.step, cfg.eps)

    def objective(emb: Embeddings, _step: int) -> torch.Tensor:
        return -ensemble_distance(ensemble, emb, reference)

    if start is None:
        start = torch.zeros(len(batch), 3, APF_GRID, APF_GRID)
    return run_attack(grid, ensemble, objective, acfg, delta=start, progress=progress)


def probe_gradient(batch: FaceBatch, cfg: ApfClientConfig, enrolled: FaceBatch | None = None,
                   progress: bool = False) -> torch.Tensor:
    """g [B,3,S,S] on APF_GRID (Eq. 1-2, or Eq. 13 with cfg.offset): the probe model only, on the device."""
    return adversarial_noise(batch, Ensemble([cfg.probe]), cfg, enrolled, progress)


def stage_noise(server: ApfServerModel, g: torch.Tensor, stage: str) -> torch.Tensor:
    """Grid noise of one APF stage: g (APF_g), T(g) (APF_g_hat) or s = clip(T(g) + E(u)) (APF_s)."""
    if stage not in STAGES:
        raise FaceveilError(f"unknown APF stage {stage!r}; known: {', '.join(STAGES)}")
    if stage == "g":
        return g
    with torch.no_grad():
        return server.transferred(g) if stage == "g_hat" else server(g)


def check_budget(server: ApfServerModel, cfg: ApfClientConfig) -> None:
    if abs(server.eps - cfg.eps) > 1e-6:
        raise FaceveilError(f"the APF server model works at eps {server.eps * 255:.3g}/255 but the client at "
                            f"{cfg.eps * 255:.3g}/255: use the server's budget")


def protect_local(batch: FaceBatch, server: ApfServerModel, cfg: ApfClientConfig, stage: str = "s",
                  enrolled: FaceBatch | None = None) -> torch.Tensor:
    """Both halves of APF in one process (the `apf-local` method): canonical noise [B,3,256,256] of the stage."""
    check_budget(server, cfg)
    g = probe_gradient(batch, cfg, enrolled)
    return to_canonical(stage_noise(server, g, stage))


def local_method(server: ApfServerModel, cfg: ApfClientConfig, stage: str = "s") -> ImageMethod:
    """`protect_local` as an image method. APF's budget and surrogates are fixed by the server model's training, so
    the caller's ensemble and attack settings are not used."""
    def method(batch: FaceBatch, _ensemble: Ensemble, _attack: AttackConfig) -> Perturbation:
        return Perturbation(protect_local(batch, server, cfg, stage))

    return method


def client_config(options: MethodOptions, eps: float, meta: dict) -> ApfClientConfig:
    """The client settings: the server's eps, and unless given, the gradient algorithm it was trained on. The
    client's eps is the server's: g must lie in the eps-ball the server networks were trained for."""
    algorithm = options.apf_algorithm or meta.get("algorithm") or ApfClientConfig.algorithm
    probe = meta.get("probe", options.apf_probe)
    if probe != options.apf_probe:
        raise FaceveilError(f"the APF server networks were trained for probe {probe!r}, this client uses "
                            f"{options.apf_probe!r}")
    return ApfClientConfig(algorithm=algorithm, eps=float(eps), offset=options.apf_offset, seed=options.seed,
                           probe=options.apf_probe).validate()


def build_local(_name: str, options: MethodOptions, _targets: object = None) -> ImageMethod:
    """The registry's builder of apf-local: both halves of APF in this process, the packaged server networks."""
    from faceveil.methods.apf.networks import load_server_model

    model = load_server_model()
    return local_method(model, client_config(options, model.eps, model.meta))


def build_remote(_name: str, options: MethodOptions, _targets: object = None) -> ImageMethod:
    """The registry's builder of apf: the probe gradient g of each face goes to a `faceveil serve` server, which
    answers the noise s; the photo never leaves this process."""
    from faceveil.methods.apf.client import NoiseClient

    if not options.server:
        raise FaceveilError("method apf needs a server URL (a `faceveil serve` address); apf-local runs the server "
                            "networks here instead")
    client = NoiseClient(options.server)
    health = client.health()
    if health["grid"] != APF_GRID:
        raise FaceveilError(f"the APF server at {options.server} works on a {health['grid']} px grid, this client "
                            f"on {APF_GRID} px: versions differ ({health.get('version')})")
    cfg = client_config(options, health["eps"], health.get("model") or {})

    def method(batch: FaceBatch, _ensemble: Ensemble, _attack: AttackConfig) -> Perturbation:
        return Perturbation(to_canonical(client.noise(probe_gradient(batch, cfg))))

    return method
