"""APF: client gradients, the server networks, their checkpoints, training and the evaluation protocol."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from faceveil.attacks.diversity import APF_DI_TRANSFORMS, input_diversity
from faceveil.errors import FaceveilError
from faceveil.methods.apf.networks import (
    APF_GRID,
    ApfServerModel,
    default_checkpoint,
    load_server_model,
    save_server_model,
)
from tests.conftest import LFW_ROOT, needs_lfw, needs_weights

EPS = 8 / 255
PACKAGED = default_checkpoint()
needs_packaged = pytest.mark.skipif(not PACKAGED.is_file(), reason=f"no packaged APF checkpoint at {PACKAGED}")


def _sign_like(batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, APF_GRID, APF_GRID, generator=gen).sign() * EPS


# ------------------------------------------------------------------------------------------ networks, no data


def test_server_model_shapes_and_budget():
    model = ApfServerModel(EPS).eval()
    g = _sign_like()
    with torch.no_grad():
        model.universal.copy_(_sign_like(1, seed=1))
        s, g_hat = model(g), model.transferred(g)
    assert s.shape == g_hat.shape == (2, 3, APF_GRID, APF_GRID)
    assert float(s.abs().max()) <= EPS + 1e-7 and float(g_hat.abs().max()) <= EPS + 1e-7
    assert torch.allclose(g_hat, g)  # untrained T is the identity (residual, zero last layer)
    assert float(model.enhanced_universal().abs().max()) == 0  # E starts adding nothing (beta = 0) ...
    model.enhance.beta.data.fill_(1.0)  # ... and its conv is the identity
    assert torch.allclose(model.enhanced_universal(), model.universal, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(model(g), (g + model.universal).clamp(-EPS, EPS))
    with pytest.raises(FaceveilError):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(FaceveilError):
        model(torch.full((1, 3, APF_GRID, APF_GRID), float("nan")))


def test_unet_and_enhancement_learn():
    """Gradients reach T's and E's parameters through the clip (the joint training needs both)."""
    model = ApfServerModel(EPS)
    with torch.no_grad():
        model.transfer.head.weight.normal_(0, 0.1)  # off the zero start, so the U-Net's layers see gradient
        model.universal.copy_(_sign_like(1, seed=2) * 0.25)
        model.enhance.beta.fill_(0.5)
    model(_sign_like() * 0.5).sum().backward()
    assert model.transfer.down[0][0].weight.grad.abs().sum() > 0
    assert model.enhance.beta.grad is not None and model.enhance.conv.weight.grad.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    model = ApfServerModel(EPS, meta={"server_models": ["faceres", "dlib"], "algorithm": "m-di2-fgsm"})
    with torch.no_grad():
        model.universal.copy_(_sign_like(1))
        model.transfer.head.weight.normal_(0, 0.1)
    path = tmp_path / "apf.pt"
    save_server_model(model, path)
    loaded = load_server_model(path)
    g = _sign_like()
    with torch.no_grad():
        assert torch.equal(loaded(g), model.eval()(g))
    assert loaded.meta["server_models"] == ["faceres", "dlib"] and loaded.eps == pytest.approx(EPS)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_checkpoint_rejects_corrupt_files(tmp_path):
    path = tmp_path / "apf.pt"
    save_server_model(ApfServerModel(EPS), path)
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint at all" * 10}
    for name, payload in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(payload)
        with pytest.raises(FaceveilError):
            load_server_model(bad)

    class Evil:
        def __reduce__(self):
            return (print, ("arbitrary code",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "faceveil-apf-server", "x": Evil()}))
    with pytest.raises(FaceveilError):
        load_server_model(evil)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["universal"] = torch.zeros(1, 3, 8, 8)  # wrong shape
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(FaceveilError, match="misshapen"):
        load_server_model(tmp_path / "shape.pt")
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta_json"])
    payload["meta_json"] = json.dumps({**meta, "grid": 64})
    torch.save(payload, tmp_path / "grid.pt")
    with pytest.raises(FaceveilError, match="grid"):
        load_server_model(tmp_path / "grid.pt")
    with pytest.raises(FaceveilError, match="not found"):
        load_server_model(tmp_path / "missing.pt")


def test_di_transforms_seeded_and_default_unchanged():
    x = torch.rand(2, 3, 32, 32)
    a = input_diversity(x, 1.0, torch.Generator().manual_seed(3), transforms=APF_DI_TRANSFORMS)
    b = input_diversity(x, 1.0, torch.Generator().manual_seed(3), transforms=APF_DI_TRANSFORMS)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    # the default (Xie's resize-and-pad) draws the same random numbers as before the extension
    legacy = input_diversity(x, 0.5, torch.Generator().manual_seed(4))
    again = input_diversity(x, 0.5, torch.Generator().manual_seed(4), transforms=("resize",))
    assert torch.equal(legacy, again)
    with pytest.raises(ValueError):
        input_diversity(x, 1.0, torch.Generator(), transforms=("resize", "nope"))


# ----------------------------------------------------------------------------------- with weights and LFW faces


def _faces(names: list[str], geometries: list[str]):
    from faceveil.datasets.faces import landmarks_for
    from faceveil.methods.apf.train import face_batch

    files = [LFW_ROOT / "images" / n.rsplit("_", 1)[0] / f"{n}.jpg" for n in names]
    landmarks, _ = landmarks_for(files, progress=False)
    return face_batch(files, landmarks, geometries)


@needs_weights
@needs_lfw
@pytest.mark.parametrize("algorithm", ["fgsm", "i-fgsm", "mi-fgsm", "di2-fgsm", "m-di2-fgsm"])
@pytest.mark.slow
def test_probe_gradient_within_eps_and_moves_away(algorithm):
    from faceveil.attacks.core import Ensemble, clean_embeddings, ensemble_distance, perturbed_embeddings
    from faceveil.methods.apf.probe import ApfClientConfig, on_grid, probe_gradient

    batch = _faces(["Aaron_Peirsol_0001"], ["arcface112"])
    enrolled = _faces(["Aaron_Peirsol_0002"], ["arcface112"])
    cfg = ApfClientConfig(algorithm=algorithm, iterations=3)
    g = probe_gradient(batch, cfg, enrolled)
    assert g.shape == (1, 3, APF_GRID, APF_GRID)
    assert float(g.abs().max()) <= EPS + 1e-6 and float(g.abs().max()) > EPS / 2
    probe = Ensemble(["mobileface"])
    reference = clean_embeddings(enrolled, probe)
    before = ensemble_distance(probe, clean_embeddings(batch, probe), reference)
    after = ensemble_distance(probe, perturbed_embeddings(on_grid(batch), probe, g), reference)
    assert float(after) > float(before) + 0.1
    assert torch.equal(g, probe_gradient(batch, cfg, enrolled))  # seeded


@needs_weights
@needs_lfw
@pytest.mark.slow
def test_self_protection_and_offset_seeded():
    from faceveil.attacks.core import Ensemble, clean_embeddings, ensemble_distance, perturbed_embeddings
    from faceveil.methods.apf.probe import ApfClientConfig, feature_offsets, on_grid, probe_gradient

    batch = _faces(["Aaron_Peirsol_0001", "Aaron_Peirsol_0003"], ["arcface112"])
    plain = ApfClientConfig(algorithm="i-fgsm", iterations=3)
    g = probe_gradient(batch, plain)  # x_e = x: starts off the distance's minimum, then pushes away
    probe = Ensemble(["mobileface"])
    moved = ensemble_distance(probe, perturbed_embeddings(on_grid(batch), probe, g), clean_embeddings(batch, probe))
    assert bool((moved > 0.1).all())
    offset = dataclasses.replace(plain, offset=True)
    g1, g2 = probe_gradient(batch, offset), probe_gradient(batch, offset)
    assert torch.equal(g1, g2) and not torch.equal(g1, g)
    assert not torch.equal(g1, probe_gradient(batch, dataclasses.replace(offset, seed=1)))
    deltas = feature_offsets(batch, {"mobileface": 256}, seed=0)["mobileface"]
    assert float(deltas.abs().max()) <= 0.07 and 0.03 < float((deltas != 0).float().mean()) < 0.2
    assert not torch.equal(deltas[0], deltas[1])  # two photos of one person: different offsets


@needs_weights
@needs_lfw
def test_protect_local_within_eps():
    from faceveil.methods.apf.probe import ApfClientConfig, protect_local

    batch = _faces(["Aaron_Peirsol_0001"], ["arcface112"])
    server = ApfServerModel(EPS).eval()
    with torch.no_grad():
        server.universal.copy_(_sign_like(1))
    for stage in ("g", "g_hat", "s"):
        noise = protect_local(batch, server, ApfClientConfig(algorithm="fgsm"), stage)
        assert noise.shape == (1, 3, 256, 256) and float(noise.abs().max()) <= EPS + 1e-6
    with pytest.raises(FaceveilError, match="eps"):
        protect_local(batch, server, ApfClientConfig(algorithm="fgsm", eps=4 / 255))


def test_trainer_initial_weights_come_from_the_seed(tmp_path):
    from faceveil.methods.apf.train import Trainer, TrainSettings

    def weights(seed: int) -> dict:
        return Trainer(tmp_path, tmp_path / "apf.pt", TrainSettings(seed=seed)).model.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@needs_lfw
def test_training_identities_never_in_pairs():
    from faceveil.methods.apf.train import pairs_identities, training_files

    files, info = training_files(LFW_ROOT, 20, seed=0, progress=False)
    assert len(files) == 20 and not {f.parent.name for f in files} & pairs_identities(LFW_ROOT)
    assert info["excluded_identities"] > 4000


@needs_weights
@needs_lfw
@pytest.mark.slow
def test_tiny_training_lowers_loss_and_resumes(tmp_path, monkeypatch):
    from faceveil.methods.apf import train as T
    from faceveil.methods.apf.probe import ApfClientConfig

    monkeypatch.setattr(T, "pairs_folder", lambda key: tmp_path / "pairs" / key)
    settings = T.TrainSettings(server_models=["dlib"], images=4, epochs=1, transfer_epochs=2, universal_epochs=1,
                               universal_steps=1, batch=4, lr=1e-3, client=ApfClientConfig(iterations=2))
    out = tmp_path / "apf.pt"
    summary = T.train(LFW_ROOT, out, settings, progress=False)
    # each phase lowers its own loss: Eq. 4 over the transfer epochs, Eq. 9 over the joint epoch
    assert summary["history"]["transfer"][-1] < summary["loss_at_phase_start"]["transfer"]
    assert summary["loss_after"]["joint"] < summary["loss_at_phase_start"]["joint"]
    model = load_server_model(out)
    assert model.meta["server_models"] == ["dlib"] and model.meta["training"]["images"] == 4
    lines = [json.loads(line) for line in (tmp_path / "apf.pt.log.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in lines if e["event"] == "epoch"] == ["universal", "transfer", "transfer", "joint"]
    resumed = T.train(LFW_ROOT, out, dataclasses.replace(settings, epochs=2), resume=True, progress=False)
    assert resumed["epochs"] == {"universal": 1, "transfer": 2, "joint": 2}
    pairs_log = [e for e in (json.loads(x) for x in (tmp_path / "apf.pt.log.jsonl").read_text().splitlines())
                 if e["event"] == "pairs"]
    assert pairs_log[-1]["computed_chunks"] == 0  # the (g, g~) cache was reused
    with pytest.raises(FaceveilError, match="other settings"):
        T.train(LFW_ROOT, out, dataclasses.replace(settings, lr=0.5), resume=True, progress=False)


@needs_weights
@needs_packaged
def test_packaged_checkpoint_loads():
    model = load_server_model()
    assert PACKAGED.stat().st_size <= 8 * 2**20
    assert model.eps == pytest.approx(EPS) and model.meta["grid"] == APF_GRID
    assert model.meta["probe"] not in model.meta["server_models"]
    with torch.no_grad():
        s = model(_sign_like())
    assert s.shape == (2, 3, APF_GRID, APF_GRID) and float(s.abs().max()) <= EPS + 1e-7


@needs_weights
@needs_lfw
@pytest.mark.slow
def test_eval_verification_asr_tiny(tmp_path):
    from faceveil.cli import main

    checkpoint = tmp_path / "apf.pt"
    model = ApfServerModel(EPS, meta={"server_models": ["dlib"], "ensemble_weights": [1.0], "probe": "mobileface",
                                      "algorithm": "m-di2-fgsm"})
    save_server_model(model, checkpoint)
    out = tmp_path / "asr.json"
    code = main(["eval", "verification-asr", "--protocol", "apf", "--dataset", f"lfw={LFW_ROOT}", "--limit", "4",
                 "--algorithms", "fgsm,m-di2-fgsm", "--judges", "mobileface,dlib", "--iterations", "1",
                 "--adversarial-limit", "2", "--checkpoint", str(checkpoint), "--json", str(out), "--quiet"])
    assert code == 0
    doc = json.loads(out.read_text())
    asr_rows = [r for r in doc["rows"] if r["table"] == "asr"]
    assert len(asr_rows) == 2 * 4 * 2  # algorithms x (3 stages + original image accessible) x judges
    assert all(-1 <= r["asr"] <= 1 and r["total"] == 4 and 0 < r["ssim"] <= 1 for r in asr_rows)
    assert {r["box"] for r in asr_rows} == {"probe", "white"}
    t4 = [r for r in doc["rows"] if r["table"] == "adversarial-matching"]
    assert {r["offset"] for r in t4} == {"w/o delta", "w/ delta"} and doc["settings"]["table4_pairs"] >= 1
    assert np.isfinite([r["asr"] for r in t4]).all()


def test_eval_rejects_unknown_algorithm(tmp_path):
    from faceveil.cli import main

    if LFW_ROOT is None:
        pytest.skip("LFW not found")
    assert main(["eval", "verification-asr", "--dataset", f"lfw={LFW_ROOT}", "--algorithms", "pgd",
                 "--checkpoint", str(Path(tmp_path) / "none.pt")]) == 2
