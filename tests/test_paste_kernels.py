"""The optimiser's fused paste-back and crop-sampling kernels (photos mode) against the torch reference
(`FaceBatch.perturbed` then `canonical.sample`): the same crops and the same gradient, for faces the paste
upsamples, low-passes (smaller than canonical space) or meets on a downscaled region, several source sizes in one
batch, and a face cut by the photo's edge; deterministic whatever the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceveil.attacks.faces import PastedRegions, alignment_jitter, from_photos
from faceveil.detect import canonical as C
from faceveil.detect.align import ARCFACE_112

GEOMETRIES = ["arcface112", "loose224"]


def _face(size: int, scale: float, seed: int, centre: tuple[float, float] | None = None):
    gen = np.random.default_rng(seed)
    image = np.kron(gen.uniform(0, 255, (12, 12, 3)), np.ones((size // 12 + 1, size // 12 + 1, 1)))[:size, :size]
    image = np.clip(image + gen.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    angle = 0.1 + 0.1 * seed
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    return image, (np.asarray(ARCFACE_112) - 56) @ rot.T + (centre or (size / 2, size / 2))


def _batch():
    """Five faces: upsampled (1.5), downscaled region (4.0), two low-passed sizes (0.8, 0.6), one cut by the edge."""
    faces = [_face(480, 1.5, 0), _face(960, 4.0, 1), _face(480, 0.8, 2), _face(480, 0.6, 3),
             _face(480, 1.5, 4, centre=(60, 70))]
    return from_photos([f[0] for f in faces], [f[1] for f in faces], GEOMETRIES, "photos")


def _views(batch, regions, jitter):
    gen = torch.Generator().manual_seed(3)
    views = [batch.crops(regions, g, jitter, gen) for g in GEOMETRIES]
    return views + [batch.canonical(regions)]


@pytest.mark.parametrize("jitter", [0.0, 2.0])
def test_fused_paste_matches_torch_reference(jitter: float):
    batch = _batch()
    assert len(batch.paste_groups) >= 3  # several low-pass sizes in one batch
    delta = (torch.rand(len(batch), 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 8 / 255
    weights = [torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for v in _views(batch, batch.regions,
                                                                                              0.0)]
    seen = []
    for fused in (False, True):
        d = delta.clone().requires_grad_(True)
        regions = batch.pasted(d) if fused else batch.perturbed(d)
        assert isinstance(regions, PastedRegions) == fused
        views = _views(batch, regions, jitter)
        sum((v * w).sum() for v, w in zip(views, weights, strict=True)).backward()
        seen.append(([v.detach() for v in views], d.grad))
    for reference, fused in zip(seen[0][0], seen[1][0], strict=True):
        assert float((reference - fused).abs().max()) < 1e-4  # float rounding; 8-bit levels are 4e-3 apart
    # the reference also back-propagates through the mask's far tails, where no pixel can change (row spans)
    reference_grad, fused_grad = seen[0][1], seen[1][1]
    assert float((reference_grad - fused_grad).norm() / reference_grad.norm()) < 1e-3


def test_fused_paste_is_deterministic_across_thread_counts():
    batch = _batch()
    delta = (torch.rand(len(batch), 3, 256, 256, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 8 / 255
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            d = delta.clone().requires_grad_(True)
            crops = batch.crops(batch.pasted(d), "arcface112", 2.0, torch.Generator().manual_seed(4))
            crops.square().sum().backward()
            out.append((crops.detach(), d.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_take_keeps_the_fused_paste():
    batch = _batch()
    delta = (torch.rand(len(batch), 3, 256, 256, generator=torch.Generator().manual_seed(6)) * 2 - 1) * 8 / 255
    index = torch.tensor([4, 0, 0, 2])
    whole = batch.crops(batch.pasted(delta), "arcface112")
    part = batch.take(index)
    assert torch.allclose(part.crops(part.pasted(delta[index]), "arcface112"), whole[index], atol=1e-6)


def test_crop_kernel_samples_through_any_matrix():
    """The crop kernel samples through dst -> region matrices, here with a large jitter composed in, and reads
    pixels outside the region as zeros (the face cut by the edge): the same as torch's sampling."""
    batch = _batch()
    delta = (torch.rand(len(batch), 3, 256, 256, generator=torch.Generator().manual_seed(8)) * 2 - 1) * 8 / 255
    m = C.compose(batch.crop_to_region["arcface112"],
                  alignment_jitter(len(batch), 112, 20.0, torch.Generator().manual_seed(7)))
    fused = batch.pasted(delta).sample(m, (112, 112))
    assert float((fused - C.sample(batch.perturbed(delta), m, (112, 112))).abs().max()) < 1e-4


def test_warmup_compiles_every_kernel():
    from faceveil.pipeline.warmup import compile_kernels

    assert compile_kernels() > 0
