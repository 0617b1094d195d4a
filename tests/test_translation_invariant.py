"""TI gradient smoothing (Dong et al. 2019) in the attack core: kernel, convolution, and that it reaches the
optimisation and the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_weights

from faceveil.attacks.diversity import smoothing_taps, translation_invariant
from faceveil.cli import build_parser, main


def test_kernel_is_a_normalised_symmetric_gaussian():
    taps = smoothing_taps(7)
    assert taps.shape == (7,) and torch.isclose(taps.sum(), torch.tensor(1.0))
    assert torch.equal(taps, taps.flip(0)) and taps[3] == taps.max() and taps[0] == taps.min()
    assert torch.isclose(taps[0] / taps[3], torch.exp(torch.tensor(-4.5)))  # +-3 sigma at the ends
    with pytest.raises(ValueError, match="odd"):
        smoothing_taps(4)


def test_separable_passes_equal_the_two_dimensional_kernel():
    grad = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    kernel = torch.outer(smoothing_taps(9), smoothing_taps(9)).expand(3, 1, 9, 9)
    assert torch.allclose(translation_invariant(grad, 9), F.conv2d(grad, kernel, padding=4, groups=3), atol=1e-6)


def test_smoothing_keeps_flat_gradients_and_spreads_a_spike():
    flat = torch.full((2, 3, 32, 32), 0.25)
    assert torch.allclose(translation_invariant(flat, 5)[..., 4:-4, 4:-4], flat[..., 4:-4, 4:-4])
    spike = torch.zeros(1, 3, 32, 32)
    spike[0, 1, 16, 16] = 1.0
    smooth = translation_invariant(spike, 5)
    assert smooth.shape == spike.shape and smooth[0, 0].abs().max() == 0 and smooth[0, 2].abs().max() == 0
    assert torch.isclose(smooth[0, 1].sum(), torch.tensor(1.0)) and int((smooth[0, 1] > 0).sum()) == 25
    assert translation_invariant(spike, 0) is spike and translation_invariant(spike, 1) is spike


def test_cli_takes_the_kernel_size_and_refuses_even_ones(capsys):
    from faceveil.cli.protect import protect_settings

    parser = build_parser()
    settings = protect_settings(parser.parse_args(["protect", "x", "-o", "y", "--smoothing", "7"]))
    assert settings.attack.smoothing == 7
    assert protect_settings(parser.parse_args(["protect", "x", "-o", "y"])).attack.smoothing == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["protect", "x", "-o", "y", "--smoothing", "4"])
    assert exit_info.value.code != 0 and "odd" in capsys.readouterr().err


@needs_weights
def test_smoothing_reaches_the_optimisation():

    from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, loss_gradient
    from faceveil.attacks.faces import from_photos
    from faceveil.detect.cache import detect_file
    from faceveil.detect.mtcnn import MTCNN
    from faceveil.io import weights
    from faceveil.io.images import read_image
    from faceveil.methods import pgd

    photo = weights.sample_photos()[2]
    found, _ = detect_file(photo, MTCNN(), max_side=1024)
    face = max(found, key=lambda f: f.size)
    ensemble = Ensemble(["mobileface"])
    batch = from_photos([read_image(photo).rgb], [face.landmarks], ensemble.geometries, "crops")
    original = clean_embeddings(batch, ensemble)

    def objective(emb, _step):
        return -(emb["mobileface"] - original["mobileface"]).pow(2).sum(dim=1)

    delta = torch.zeros(1, 3, 256, 256)
    gen = torch.Generator()
    raw = loss_gradient(batch, ensemble, objective, delta, 0, AttackConfig(), gen)
    smooth = loss_gradient(batch, ensemble, objective, delta, 0, AttackConfig(smoothing=9), gen)
    assert torch.allclose(smooth, translation_invariant(raw, 9), atol=1e-7)
    cfg = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=2, momentum=1.0)
    plain = pgd.protect(batch, ensemble, cfg)
    ti = pgd.protect(batch, ensemble, AttackConfig(eps=8 / 255, alpha=2 / 255, steps=2, momentum=1.0, smoothing=9))

    def roughness(d: torch.Tensor) -> float:  # mean step between neighbouring pixels
        return float((d[..., 1:, :] - d[..., :-1, :]).abs().mean())

    assert roughness(ti) < 0.8 * roughness(plain)


def test_smoothing_does_not_depend_on_the_thread_count():
    grad = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = translation_invariant(grad, 7)
        torch.set_num_threads(max(2, before))
        assert torch.equal(translation_invariant(grad, 7), one)
    finally:
        torch.set_num_threads(before)


def test_thorough_preset_and_explicit_flags_winning():
    from faceveil.cli.protect import protect_settings
    from faceveil.models import zoo
    from faceveil.pipeline import presets

    parser = build_parser()

    def settings(*flags: str):
        return protect_settings(parser.parse_args(["protect", "x", "-o", "y", *flags]))

    plain, thorough = settings(), settings("--thorough")
    assert plain.surrogates == zoo.parse_models(presets.EVERY_FAMILY)
    assert thorough.surrogates == ["mobileface", "mfn512", "dlib"]
    assert (plain.attack.diversity, plain.attack.smoothing, plain.attack.steps) == (0.0, 0, 50)
    assert (plain.attack.budget, plain.attack.ssim_target, plain.attack.psnr_floor) == ("texture", 0.93, 33.0)
    assert plain.attack.ssim_penalty and plain.attack.sample_surrogates == 2
    assert (thorough.attack.diversity, thorough.attack.smoothing, thorough.attack.steps) == (0.5, 7, 100)
    assert thorough.attack.eps == 8 / 255 and thorough.attack.alpha == 1 / 255 and thorough.attack.ssim_target == 0
    assert settings("--eps", "6").attack.eps == 6 / 255 and settings("--strength", "high").attack.steps == 100
    own = settings("--thorough", "--surrogates", "mfn512", "--diversity", "0", "--smoothing", "3", "--iters", "20")
    assert own.surrogates == ["mfn512"] and (own.attack.diversity, own.attack.smoothing, own.attack.steps) == (0, 3, 20)
    assert settings("--thorough", "--strength", "low").attack.steps == 60
