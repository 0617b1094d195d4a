"""The transfer levers of the attack core ported from branch protection (docs/research/protection.md): the SSIM
hinge in the step, the stochastic ensemble, crop zoom and the EOT transforms (blur, down-up, JPEG, SI, Admix). The
texture budget and the SSIM / PSNR projection are tested in test_perceptual.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import needs_weights
from PIL import Image

from faceveil.attacks import eot
from faceveil.attacks.diversity import input_diversity
from faceveil.attacks.faces import alignment_jitter


def test_differentiable_jpeg_is_close_to_pillow():
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1)),
                                             size=(96, 96), mode="bilinear")
    ours = eot.jpeg(smooth, 75)
    buf = io.BytesIO()
    Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buf, "JPEG", quality=75, subsampling=0)
    pillow = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1)[None].float() / 255
    assert float((ours - pillow).abs().mean()) < 0.6 * float((smooth - pillow).abs().mean())


@pytest.mark.parametrize("name", eot.EOT_TRANSFORMS)
def test_eot_transforms_keep_the_shape_pass_gradients_and_are_seeded(name):
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    first = input_diversity(x, 1.0, torch.Generator().manual_seed(3), transforms=(name,))
    again = input_diversity(x, 1.0, torch.Generator().manual_seed(3), transforms=(name,))
    assert first.shape == x.shape and torch.equal(first, again)
    first.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown"):
        input_diversity(x, 1.0, torch.Generator(), transforms=("nope",))


def test_zoom_widens_only_the_scale_of_the_alignment_jitter():
    def scales(zoom: float) -> torch.Tensor:
        m = alignment_jitter(2000, 112, 0.0, torch.Generator().manual_seed(0), zoom)
        return m[:, 0, :2].norm(dim=1)

    assert torch.allclose(scales(0.0), torch.ones(2000, dtype=torch.float64))
    wide = scales(0.1)
    assert 0.89 < float(wide.min()) < 0.91 and 1.09 < float(wide.max()) < 1.11


@needs_weights
def test_levers_run_through_the_optimisation_and_meet_the_visibility_budget():
    from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, ensemble_distance, run_attack
    from faceveil.attacks.faces import from_photos
    from faceveil.attacks.perceptual import SsimBudget
    from faceveil.detect.cache import detect_file
    from faceveil.io.images import read_image
    from faceveil.io.weights import sample_photos

    path = sample_photos()[0]
    faces, _ = detect_file(path)
    photo = read_image(path).rgb
    ensemble = Ensemble(["mobileface", "mfn512"])
    batch = from_photos([photo], [faces[0].landmarks], ensemble.geometries, "photos")
    original = clean_embeddings(batch, ensemble)
    assert ensemble.draw(1, torch.Generator().manual_seed(0)) == ensemble.draw(1, torch.Generator().manual_seed(0))
    part = {"mfn512": original["mfn512"]}  # a stochastic draw: the weights renormalised over the drawn surrogates
    assert torch.equal(ensemble_distance(ensemble, part, original),
                       ensemble_distance(Ensemble(["mfn512"]), part, original))
    cfg = AttackConfig(eps=12 / 255, alpha=2 / 255, steps=4, momentum=1.0, jitter=2.0, budget="texture",
                       ssim_target=0.97, ssim_penalty=True, sample_surrogates=1, zoom=0.05, diversity=0.5,
                       diversity_transforms=("resize", "blur", "jpeg"))
    delta = run_attack(batch, ensemble, lambda emb, _s: -ensemble_distance(ensemble, emb, original), cfg)
    assert delta.abs().max() > 0
    assert float(SsimBudget(batch, 0.97).measure(delta)[0][0]) >= 0.968
