"""The APF server networks (apf-mm2020 §3.4-3.5): the gradient transfer module T (a U-Net, Eq. 3-4), the universal
perturbation u (Eq. 7) and its enhancement module E (Eq. 8), combined as s = clip_eps(T(g) + E(u)) (Eq. 9).

The grid. The client's gradient g, u, and the server's answer s all live on one common grid, APF_GRID: the canonical
face space of faceveil.detect.canonical (256 x 256, face-centred, holding every recogniser's crop: ArcFace-112,
the loose 224 crop and dlib's 150 chip) downsampled 2x to 128 x 128. Why that grid:
- one grid for every model: the probe (ArcFace-112 geometry) and the server models (loose-224, dlib-150) see
  different crops, and the canonical space contains all of them, so a gradient on it means the same pixels to
  every model, client and server;
- 128 keeps the face at about the resolution of the recognisers' inputs (the 112 crop spans 87 grid pixels, the
  224 one 121): a perturbation finer than the crops is partly lost when they are resampled, and coarser
  perturbations transfer better between models;
- it keeps the U-Net and the request small: 3 x 128 x 128 float32 = 192 KiB per face on the wire, and T's forward
  pass a few tens of milliseconds on a CPU.
The client upsamples s (bilinear) to canonical 256 and pastes it onto the photo (probe.to_canonical).

Checkpoints are a torch file holding only tensors and one JSON string (`torch.load(weights_only=True)`: no
arbitrary pickle), validated on load against the architecture its metadata describes.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError
from faceveil.io.atomic import atomic_path

APF_GRID = C.CANONICAL_SIZE // 2  # 128: see the module docstring
CHECKPOINT_FORMAT = "faceveil-apf-server"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT = "data/apf/apf-default.pt"  # inside the faceveil package
DEFAULT_WIDTH = 8  # channels of the U-Net's first level (small: trained on a few hundred faces, runs on a CPU)
DEFAULT_DEPTH = 3  # down-samplings of the U-Net
_GROUPS = 4  # GroupNorm groups: per-sample normalisation, so a request's answer never depends on its batch


def canonical_from_grid(noise: torch.Tensor) -> torch.Tensor:
    """APF_GRID noise [B,3,S,S] -> canonical space [B,3,256,256] (bilinear: stays within the same budget)."""
    size = C.CANONICAL_SIZE
    return F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(_GROUPS, c_out), nn.LeakyReLU(0.2),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(_GROUPS, c_out), nn.LeakyReLU(0.2),
    )


class TransferUNet(nn.Module):
    """T (Eq. 3): an encoder-decoder with skip connections (Ronneberger et al. 2015), g -> g_hat, both in the
    eps-ball. It is residual, g_hat = clip_eps(g + eps * tanh(U-Net(g / eps))), and its last layer starts at zero,
    so an untrained T is the identity: with the few hundred training faces a CPU affords (the paper had 50,000),
    T learns corrections to the probe's gradient instead of having to learn to reproduce it first."""

    def __init__(self, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH):
        super().__init__()
        channels = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(3, channels[0])])
        self.down.extend(_block(channels[i], channels[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(_block(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], 3, 1)
        nn.init.zeros_(self.head.weight)
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)
        self.depth = depth

    def forward(self, g: torch.Tensor, eps: float) -> torch.Tensor:
        x = g / eps
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return (g + eps * torch.tanh(self.head(x))).clamp(-eps, eps)


class Enhancement(nn.Module):
    """E (Eq. 8): u_hat = conv1x1(beta * u + gamma); the conv starts as the identity and beta at 0, so an untrained
    server answers T(g) alone and the joint training (Eq. 9) adds as much of u as helps. (Starting at beta = 1,
    a saturated u cancels half of a saturated g in the clip, and the few training steps a CPU affords were spent
    undoing that: measured.)"""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(()))
        self.gamma = nn.Parameter(torch.zeros(()))
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.conv(self.beta * u + self.gamma)


class ApfServerModel(nn.Module):
    """T + u + E on APF_GRID: forward(g) = s = clip_eps(T(g) + E(u)) (Eq. 9); transferred(g) = g_hat = T(g)."""

    universal: torch.Tensor  # u [1,3,S,S], a buffer

    def __init__(self, eps: float = 8 / 255, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH,
                 meta: dict | None = None):
        super().__init__()
        self.eps = float(eps)
        self.transfer = TransferUNet(width, depth)
        self.enhance = Enhancement()
        self.register_buffer("universal", torch.zeros(1, 3, APF_GRID, APF_GRID))
        self.meta: dict[str, Any] = {**(meta or {}), "eps": self.eps, "grid": APF_GRID,
                                     "architecture": {"width": width, "depth": depth}}

    def transferred(self, g: torch.Tensor) -> torch.Tensor:
        """g_hat = T(g), the APF_g_hat stage [B,3,S,S], within eps."""
        return self.transfer(check_gradient(g, self.eps), self.eps).clamp(-self.eps, self.eps)

    def enhanced_universal(self) -> torch.Tensor:
        """u_hat = E(u) [1,3,S,S]."""
        return self.enhance(self.universal)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """s = clip_eps(T(g) + E(u)) [B,3,S,S]: the noise the server answers."""
        g_hat = self.transfer(check_gradient(g, self.eps), self.eps)
        return (g_hat + self.enhanced_universal()).clamp(-self.eps, self.eps)


def check_gradient(g: torch.Tensor, eps: float) -> torch.Tensor:
    """A client gradient as the networks take it: float [B,3,S,S] on APF_GRID, finite, clipped to the eps-ball
    (a g made with a larger budget is clipped, never rejected for its values)."""
    if not isinstance(g, torch.Tensor) or g.dim() != 4 or tuple(g.shape[1:]) != (3, APF_GRID, APF_GRID):
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise FaceveilError(f"an APF gradient is [B, 3, {APF_GRID}, {APF_GRID}] on the APF grid, got {shape}")
    if not g.is_floating_point() or not bool(torch.isfinite(g).all()):
        raise FaceveilError("an APF gradient must be finite floating-point values")
    return g.float().clamp(-eps, eps)


def checkpoint_payload(model: ApfServerModel) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "meta_json": json.dumps(model.meta, sort_keys=True, default=str),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}


def save_server_model(model: ApfServerModel, path: str | Path) -> None:
    """Write the model atomically: its state_dict and its metadata as one JSON string."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint_payload(model), tmp)


def default_checkpoint() -> Path:
    """The checkpoint shipped inside the package."""
    return Path(str(resources.files("faceveil").joinpath(DEFAULT_CHECKPOINT)))


def load_server_model(path: str | Path | None = None) -> ApfServerModel:
    """Load and validate a checkpoint (None = the packaged one); the model comes back in eval mode, frozen."""
    path = default_checkpoint() if path is None else Path(path)
    if not path.is_file():
        hint = " (train one: faceveil train apf)" if path == default_checkpoint() else ""
        raise FaceveilError(f"APF checkpoint {path} not found{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, or a pickle that is more than tensors
        raise FaceveilError(f"{path} is not a readable APF checkpoint ({type(exc).__name__})") from None
    model = model_from_payload(payload, str(path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_from_payload(payload: Any, source: str) -> ApfServerModel:
    """Build the model a checkpoint payload describes, checking every field before loading its tensors."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FaceveilError(f"{source} is not an APF server checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise FaceveilError(f"{source}: checkpoint version {payload.get('version')!r}, this faceveil reads "
                            f"{CHECKPOINT_VERSION}")
    meta = _parse_meta(payload.get("meta_json"), source)
    arch = meta["architecture"]
    model = ApfServerModel(meta["eps"], arch["width"], arch["depth"], meta)
    _load_state(model, payload.get("state_dict"), source)
    return model


def _parse_meta(text: Any, source: str) -> dict:
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise FaceveilError(f"{source}: the checkpoint metadata is not a JSON object")
    eps, grid, arch = meta.get("eps"), meta.get("grid"), meta.get("architecture")
    if not isinstance(eps, float | int) or not 0 < float(eps) <= 1 or not math.isfinite(float(eps)):
        raise FaceveilError(f"{source}: eps {eps!r} is not in (0, 1]")
    if grid != APF_GRID:
        raise FaceveilError(f"{source}: trained on a {grid} grid, this faceveil uses {APF_GRID}")
    if (not isinstance(arch, dict) or not all(isinstance(arch.get(k), int) for k in ("width", "depth"))
            or not 4 <= arch["width"] <= 256 or arch["width"] % _GROUPS or not 1 <= arch["depth"] <= 5):
        raise FaceveilError(f"{source}: unknown architecture {arch!r}")
    return meta


def _load_state(model: ApfServerModel, state: Any, source: str) -> None:
    expected = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise FaceveilError(f"{source}: the weights do not match the architecture in its metadata")
    for name, tensor in state.items():
        if (not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape
                or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all())):
            raise FaceveilError(f"{source}: weight {name!r} is missing, misshapen or not finite")
    model.load_state_dict(state, strict=True)
