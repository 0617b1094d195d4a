"""GAP (Poursaeed et al., CVPR 2018) as OPOM's comparison method (§3.3.3): a ResNet generator maps a fixed noise
pattern z ~ U(0, 1) to a universal perturbation, scaled onto the budget (L-inf: eps * G(z) / max|G(z)|; L2:
eps * G(z) / ||G(z)||), and is trained with Adam on the feature-level loss of Eq. 17 (FI-UAP) over the person's
images, for 10 epochs (§4.2.1). With n_M > 1 each mask has its own noise pattern and Eq. 19's diversity term joins
the loss.

The generator is GAP's ResNet generator (7x7 conv, two stride-2 downsamplings, residual blocks, two upsamplings,
7x7 conv) made small so that it trains in seconds on a CPU: 8 base channels and 2 residual blocks instead of 64 and
6. The gradient of the loss with respect to the generated mask comes from the attack core (`loss_gradient`, the
same forward through paste-back and the surrogates as every other method, with its jitter / diversity / DFANet
dropout); only that gradient is carried back into the generator's weights here.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from faceveil.attacks.budgets import scale_to_budget
from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, feature_dropout, loss_gradient
from faceveil.attacks.faces import FaceBatch
from faceveil.detect import canonical as C
from faceveil.methods.base import MaskResult, PersonMaskOptions
from faceveil.methods.opom.loss import Layout, PersonLoss

BASE_CHANNELS = 8
RESIDUAL_BLOCKS = 2
# GAP's optimiser: Adam, beta1 0.5. Its learning rate (2e-4) is for thousands of ImageNet updates; a person has
# ~10 images, so 10 epochs are ~50 updates: a larger rate lets the generator actually move in that budget.
LEARNING_RATE = 2e-3
BETAS = (0.5, 0.999)
NOISE_SEED_OFFSET = 104_729  # the generator's own random streams, apart from the core's cfg.seed


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """[N,3,256,256] noise -> [N,3,256,256] unscaled perturbation pattern."""

    def __init__(self, channels: int = BASE_CHANNELS, blocks: int = RESIDUAL_BLOCKS):
        super().__init__()
        c = channels
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU(True)]
        for k in (1, 2):  # downsample
            layers += [nn.Conv2d(c * k, c * 2 * k, 3, stride=2, padding=1), nn.InstanceNorm2d(c * 2 * k),
                       nn.ReLU(True)]
        layers += [ResidualBlock(c * 4) for _ in range(blocks)]
        for k in (4, 2):  # upsample
            layers += [nn.ConvTranspose2d(c * k, c * k // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(c * k // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _seeded_generator(seed: int) -> ResnetGenerator:
    """The generator with weights drawn from `seed`, leaving torch's global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResnetGenerator()


def train_gap(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
              progress: bool = False) -> MaskResult:
    """Train the generator on the person's faces; returns MaskResult(masks [n_M,3,256,256], info)."""
    gen = torch.Generator().manual_seed(cfg.seed + NOISE_SEED_OFFSET)
    noise = torch.rand(options.masks, 3, C.CANONICAL_SIZE, C.CANONICAL_SIZE, generator=gen)
    generator = _seeded_generator(cfg.seed + NOISE_SEED_OFFSET)
    optimiser = torch.optim.Adam(generator.parameters(), lr=LEARNING_RATE, betas=BETAS)
    clean = clean_embeddings(batch, ensemble)
    core_gen = torch.Generator().manual_seed(cfg.seed)
    per_update = max(1, min(options.gap_batch, len(batch)))
    updates = 0
    with feature_dropout(list(ensemble.models.values()), cfg.dropout, core_gen):
        for _epoch in tqdm(range(options.gap_epochs), desc="gap", disable=not progress, leave=False):
            order = torch.randperm(len(batch), generator=gen)
            for faces in order.split(per_update):
                layout = Layout(len(faces), options.masks)
                part = batch.take(faces[layout.face_index])
                part_clean = {name: e[faces] for name, e in clean.items()}
                loss = PersonLoss("fi-uap", ensemble, part_clean, layout, options.diversity_weight)
                masks = scale_to_budget(generator(noise), cfg.norm, cfg.eps)
                grad = loss_gradient(part, ensemble, loss.objective, masks, updates, cfg, core_gen,
                                     owner=layout.owner)
                optimiser.zero_grad()
                masks.backward(grad)
                optimiser.step()
                updates += 1
    with torch.no_grad():
        masks = scale_to_budget(generator(noise), cfg.norm, cfg.eps)
    return MaskResult(masks, {"epochs": options.gap_epochs, "updates": updates,
                              "generator_parameters": sum(p.numel() for p in generator.parameters())})
