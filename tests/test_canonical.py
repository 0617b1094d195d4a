"""The canonical face space: crops taken from it equal crops taken from the photo; paste-back is local, feathered,
clipped, and survives a re-crop; the straight-through rounding passes gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceveil.attacks.faces import from_photos
from faceveil.attacks.norms import descend, momentum_sign_step, momentum_update, normalise_step, project
from faceveil.detect import canonical as C
from faceveil.detect.align import ARCFACE_112, align, warp_faces


def _synthetic_photo(size: int = 480, seed: int = 0, scale: float = 1.8) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image and a rotated, scaled face landmark set inside it (`scale`: ArcFace-112 crop pixels
    per photo pixel; 1.8 is a face a little larger than in canonical space: paste upsamples)."""
    gen = np.random.default_rng(seed)
    coarse = gen.uniform(0, 255, (12, 12, 3))
    image = np.kron(coarse, np.ones((size // 12, size // 12, 1)))
    image = np.clip(image + gen.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    angle = 0.2
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    marks = (np.asarray(ARCFACE_112) - 56) @ rot.T + size / 2
    return image, marks


def test_canonical_crops_equal_photo_crops():
    image, marks = _synthetic_photo()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    canonical = warp_faces(x, torch.as_tensor(marks)[None], "canonical")
    for geometry in ("arcface112", "loose224", "dlib150"):
        m = C.canonical_to_crop_matrices(torch.as_tensor(marks)[None], geometry)
        from_canonical = C.model_crops(canonical, m, geometry)
        direct = torch.from_numpy(align(image, marks, geometry)).permute(2, 0, 1)[None].float() / 255
        assert float((from_canonical - direct).abs().mean()) < 0.02, geometry  # two resamplings vs one


def test_paste_is_local_clipped_and_recoverable():
    image, marks = _synthetic_photo()
    delta = (torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 8 / 255
    out = C.paste(image, marks, delta)
    assert out.dtype == np.uint8 and out.shape == image.shape
    changed = np.argwhere(np.any(out != image, axis=2))
    box = C.region_box(C.inverse_matrix(C.warp_matrix(marks, C.CANONICAL)), image.shape[1], image.shape[0])
    assert changed[:, 1].min() >= box[0] and changed[:, 1].max() < box[2]
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 9  # eps 8/255 plus rounding
    before = warp_faces(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, torch.as_tensor(marks)[None],
                        "canonical")
    after = warp_faces(torch.from_numpy(out).permute(2, 0, 1)[None].float() / 255, torch.as_tensor(marks)[None],
                       "canonical")
    mask = C.face_mask()
    recovered = torch.nn.functional.cosine_similarity(((after - before)[0] * mask).flatten(),
                                                      (delta * mask).flatten(), dim=0)
    assert float(recovered) > 0.8


def _seen_and_saved(scale: float, size: int = 480) -> tuple[torch.Tensor, ...]:
    """(optimiser's view, saved photo's crop, both clean crops) of one face, arcface112 crop, photos mode."""
    image, marks = _synthetic_photo(size=size, scale=scale)
    batch = from_photos([image], [marks], ["arcface112"], "photos")
    delta = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 8 / 255

    def crop(photo: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(align(photo, marks, "arcface112")).permute(2, 0, 1)[None].float() / 255

    return (batch.crops(batch.perturbed(delta), "arcface112"), crop(C.paste(image, marks, delta[0])),
            batch.crops(batch.regions, "arcface112"), crop(image))


def test_optimiser_view_equals_saved_pixels():
    """photos mode: the region the optimiser perturbs is exactly what paste() writes (faces at native scale)."""
    seen, saved, _, _ = _seen_and_saved(scale=1.5)  # canonical zoom < 1: the region is the photo's pixels
    assert float((seen - saved).abs().mean()) < 2 / 255


def test_large_face_optimised_on_downscaled_region():
    """A face far larger than canonical space is optimised on a region capped at MAX_REGION_ZOOM: the optimiser's
    view of the perturbation still agrees with what the saved full-resolution photo holds."""
    seen, saved, seen_clean, saved_clean = _seen_and_saved(scale=4.0, size=960)
    image, marks = _synthetic_photo(size=960, scale=4.0)
    assert from_photos([image], [marks], ["arcface112"], "photos").regions.shape[-1] < 0.6 * 960
    change = torch.nn.functional.cosine_similarity((seen - seen_clean).flatten(), (saved - saved_clean).flatten(), 0)
    assert float(change) > 0.85
    assert float((seen_clean - saved_clean).abs().mean()) < 8 / 255  # mostly the direct crop aliasing


def test_quantise_straight_through():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    y = C.quantise_ste(x)
    assert torch.allclose(y * 255, torch.round(y * 255))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_face_mask_feathered():
    mask = C.face_mask()[0]
    assert float(mask[128, 128]) > 0.99 and float(mask[0, 0]) < 0.01
    row = mask[128]
    assert float(row.diff().abs().max()) < 0.25  # no hard seam


def test_norms():
    d = torch.randn(4, 3, 8, 8)
    assert float(project(d, "linf", 0.1).abs().max()) <= 0.1 + 1e-7
    assert torch.all(project(d, "l2", 1.0).flatten(1).norm(dim=1) <= 1.0 + 1e-5)
    assert torch.equal(normalise_step(d, "linf"), d.sign())
    assert torch.allclose(normalise_step(d, "l2").flatten(1).norm(dim=1), torch.ones(4))
    v = momentum_update(None, d, 1.0)
    assert torch.allclose(v.abs().flatten(1).mean(1), torch.ones(4))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_descend_is_the_projected_normalised_step_exactly(norm: str):
    gen = torch.Generator().manual_seed(7)
    delta, grad = torch.randn(3, 3, 8, 8, generator=gen) * 0.02, torch.randn(3, 3, 8, 8, generator=gen)
    before = grad.clone()
    expected = project(delta - 0.01 * normalise_step(grad, norm), norm, 0.03)
    assert torch.equal(descend(delta, grad, 0.01, norm, 0.03), expected)
    assert torch.equal(grad, before)  # the gradient (maybe a momentum buffer) is left as it was


def test_fused_momentum_step_is_momentum_then_descend_exactly():
    """The one-pass L-inf momentum step gives bit for bit what momentum_update then descend give, over several
    steps (zeros in the velocity included), batches of one and several faces and chunked rows; delta is not
    written in place (hooks may hold it)."""
    for batch, side in ((1, 8), (3, 100)):  # 3 x 100 x 100 values: several of the kernel's chunks per face
        gen = torch.Generator().manual_seed(batch)
        delta = (torch.rand(batch, 3, side, side, generator=gen) * 2 - 1) * 0.03
        velocity, fused_delta, fused_velocity = None, delta.clone(), None
        for _ in range(3):
            grad = torch.randn(batch, 3, side, side, generator=gen)
            grad[0, 0, 0, :4] = 0
            velocity = momentum_update(velocity, grad, 1.0)
            delta = descend(delta, velocity, 0.01, "linf", 0.03)
            held = fused_delta.clone()
            stepped, fused_velocity = momentum_sign_step(fused_delta, fused_velocity, grad.clone(), 1.0, 0.01, 0.03)
            assert torch.equal(fused_delta, held)
            fused_delta = stepped
            assert torch.equal(fused_velocity, velocity) and torch.equal(fused_delta, delta)


def test_alignment_jitter_is_small_and_seeded():
    from faceveil.attacks.faces import alignment_jitter

    a = alignment_jitter(4, 112, 2.0, torch.Generator().manual_seed(3))
    b = alignment_jitter(4, 112, 2.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    corners = torch.tensor([[0.0, 0.0, 1.0], [111.0, 111.0, 1.0]], dtype=torch.float64)
    moved = corners @ a.transpose(-1, -2)
    assert float((moved - corners[:, :2]).abs().max()) < 6.0  # a few pixels at most, even at the corners


def test_clip_quantise_is_clamp_then_quantise():
    x = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.4 - 0.2).requires_grad_(True)
    y = C.clip_quantise_ste(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = C.quantise_ste(x2.clamp(0, 1))
    assert torch.allclose(y, y2, atol=1e-7)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y * weights).sum().backward()
    (y2 * weights).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_take_keeps_paste_warps_and_pastes_the_same():
    image, marks = _synthetic_photo()
    batch = from_photos([image, image], [marks, marks + 5], ["arcface112"], "photos")
    delta = (torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 8 / 255
    whole = batch.perturbed(delta)
    part = batch.take(torch.tensor([1, 1, 0]))
    assert part.face_warps[0] is batch.face_warps[1]  # reused, not rebuilt
    assert torch.equal(part.perturbed(delta[[1, 1, 0]]), whole[[1, 1, 0]])


def test_crops_mode_pastes_whole_canonical_regions_like_the_windows():
    """crops mode: regions are canonical space, so the perturbation is added to them whole in one op; the same
    values and gradient as pasting each face's window through the (identity) warp."""
    image, marks = _synthetic_photo()
    batch = from_photos([image, image], [marks, marks + 3], ["arcface112"], "crops")
    assert batch.in_canonical_space
    delta = ((torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(6)) * 2 - 1) * 12 / 255)
    weights = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    seen = []
    for whole in (True, False):
        batch._in_canonical_space = whole
        d = delta.clone().requires_grad_(True)
        out = batch.perturbed(d)
        (out * weights).sum().backward()
        seen.append((out.detach(), d.grad))
    assert float((seen[0][0] - seen[1][0]).abs().max()) < 1e-5
    assert float((seen[0][1] - seen[1][1]).norm() / seen[1][1].norm()) < 1e-3
