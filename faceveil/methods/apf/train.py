"""Training the APF server networks (apf-mm2020 §3.4-3.5, §4.1) on LFW identities that the evaluation never uses.

Data. The evaluation uses LFW's pairs.txt; every identity that appears in it (either side of any pair) is excluded,
and the exclusion is asserted. The training faces are a seeded choice among the remaining images whose face was
detected. A training face is protected as a user protects their own photo: x_e = x (faceveil.methods.apf.probe).

Phases, in order (each resumable):
1. pairs: for every training face, the probe's g and the server models' g~_k with the same algorithm, combined as
   g~ = sum_k alpha_k g~_k (Eq. 5), plus the server models' clean embeddings. The expensive part (30 iterations
   per server model and face), cached on disk in chunks under <faceveil home>/cache/apf-pairs/<key>/, so a second
   training run with other epochs or learning rates, or an interrupted one, does not recompute them.
2. universal: u maximising sum_i sum_j d(f(x_i + u), f(x_j)) over the training faces (Eq. 7), with f the server
   ensemble: the attack core's loop on one perturbation shared by all faces of a minibatch (its `owner` index),
   passing over the faces `universal_epochs` times.
3. transfer: T alone on Eq. 4, min ||T(g) - g~||_2, over the cached pairs (no recogniser involved: cheap).
4. joint: T and E together on Eq. 9-10, max d(f(x + clip_eps(T(g) + E(u))), f(x_e)), f the server ensemble with
   weights alpha_k (the per-model distances are averaged: their embeddings differ in size, so the features
   themselves cannot be summed as Eq. 10 writes).
Adam with a fixed learning rate (§4.1: 1e-4). A resume file (every epoch, atomic) and a JSON-lines log sit beside
the output: <out>.resume.pt and <out>.log.jsonl.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.attacks.core import (
    AttackConfig,
    Embeddings,
    Ensemble,
    ensemble_distance,
    pairwise_ensemble_distance,
    run_attack,
)
from faceveil.attacks.faces import FaceBatch, from_photos
from faceveil.datasets.faces import landmarks_for
from faceveil.datasets.lfw import identities, read_pairs
from faceveil.errors import FaceveilError
from faceveil.io import weights
from faceveil.io.atomic import atomic_path
from faceveil.io.images import read_image
from faceveil.methods.apf.networks import (
    APF_GRID,
    ApfServerModel,
    checkpoint_payload,
    model_from_payload,
    save_server_model,
)
from faceveil.methods.apf.probe import ApfClientConfig, adversarial_noise, on_grid, probe_gradient
from faceveil.models import zoo

PAIRS_FORMAT = 1  # bump when what a cached chunk holds changes
PHASES = ("universal", "transfer", "joint")


@dataclass
class TrainSettings:
    server_models: list[str] = field(default_factory=lambda: ["faceres", "dlib"])
    server_weights: list[float] | None = None  # alpha_k of Eq. 5 / 10; None = even (§3.4: 1/K)
    images: int = 160
    epochs: int = 5  # joint T+E epochs (Eq. 9)
    transfer_epochs: int = 20  # T-only epochs (Eq. 4)
    universal_epochs: int = 2  # passes over the faces learning u (Eq. 7)
    universal_steps: int = 5  # core iterations per minibatch and pass
    batch: int = 8
    lr: float = 1e-4  # §4.1
    seed: int = 0
    client: ApfClientConfig = field(default_factory=ApfClientConfig)

    def weights(self) -> list[float]:
        w = self.server_weights or [1.0] * len(self.server_models)
        if len(w) != len(self.server_models) or min(w) < 0 or sum(w) <= 0:
            raise FaceveilError("`server_weights` needs one non-negative weight per server model")
        return [x / sum(w) for x in w]

    def validate(self) -> TrainSettings:
        for name in self.server_models:
            zoo.spec(name)
        if not self.server_models:
            raise FaceveilError("APF needs at least one server model")
        if self.client.probe in self.server_models:
            raise FaceveilError(f"the probe {self.client.probe!r} cannot also be a server model")
        if self.images < 1 or self.batch < 1 or min(self.epochs, self.transfer_epochs, self.universal_epochs) < 0:
            raise FaceveilError("`images` and `batch` must be positive, epochs non-negative")
        self.weights()
        self.client.validate()
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- training data


def pairs_identities(root: Path) -> set[str]:
    """Every identity named in pairs.txt (the evaluation's)."""
    return {p.parent.name for pair in read_pairs(root) for p in (pair.a, pair.b)}


def training_files(root: Path, count: int, seed: int, progress: bool = True) -> tuple[list[Path], dict]:
    """A seeded choice of `count` images of identities outside pairs.txt whose face was detected."""
    excluded = pairs_identities(root)
    people = identities(root)
    pool = [p for name in sorted(people) if name not in excluded for p in people[name]]
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    landmarks, info = landmarks_for(order, progress)
    missing = {Path(m) for m in info["fallback_alignment"]}
    chosen = [p for p in order if p not in missing][:count]
    assert not {p.parent.name for p in chosen} & excluded, "a training identity appears in pairs.txt"
    if len(chosen) < count:
        raise FaceveilError(f"only {len(chosen)} detected images of identities outside pairs.txt, asked {count}")
    stats = {"images": len(chosen), "identities": len({p.parent.name for p in chosen}),
             "excluded_identities": len(excluded), "candidate_images": len(pool)}
    return chosen, {**stats, "landmarks": {p: landmarks[p] for p in chosen}}


def face_batch(files: list[Path], landmarks: dict[Path, np.ndarray], geometries: list[str]) -> FaceBatch:
    """The aligned faces (crops mode: the canonical face images) of dataset files."""
    photos = [read_image(f).rgb for f in files]
    return from_photos(photos, [landmarks[f] for f in files], geometries, "crops")


# ------------------------------------------------------------------------------------------ phase 1: the pairs


@dataclass
class Pairs:
    g: torch.Tensor  # [N,3,S,S] probe gradients
    g_tilde: torch.Tensor  # [N,3,S,S] Eq. 5 targets
    embeddings: Embeddings  # server model -> clean embeddings [N, D]


def _digest(description: object) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _pairs_key(s: TrainSettings) -> str:
    """The cache folder: what every chunk's pairs depend on besides its faces."""
    return _digest({"format": PAIRS_FORMAT, "grid": APF_GRID, "servers": s.server_models, "weights": s.weights(),
                    "client": dataclasses.asdict(s.client), "batch": s.batch})


def _chunk_name(index: int, files: list[Path], root: Path) -> str:
    """A chunk is named by its position and its faces, so a run with more --images (the same seeded order,
    longer) reuses the chunks of a shorter one."""
    return f"chunk-{index:05d}-{_digest([str(f.relative_to(root)) for f in files])}.pt"


def pairs_folder(key: str) -> Path:
    return weights.home() / "cache" / "apf-pairs" / key


def _compute_chunk(batch: FaceBatch, s: TrainSettings, servers: dict[str, Ensemble]) -> dict:
    g = probe_gradient(batch, s.client)
    g_tilde = sum(w * adversarial_noise(batch, servers[name], s.client)
                  for name, w in zip(s.server_models, s.weights(), strict=True))
    with torch.no_grad():
        embeddings = {name: ens.embed(batch, batch.regions)[name] for name, ens in servers.items()}
    return {"g": g, "g_tilde": g_tilde, "embeddings": embeddings}


def precompute_pairs(files: list[Path], landmarks: dict[Path, np.ndarray], root: Path, s: TrainSettings,
                     progress: bool = True) -> tuple[Pairs, dict]:
    """(g, g~) of every training face, from the chunk cache where present, computed (and cached) otherwise."""
    folder = pairs_folder(_pairs_key(s))
    folder.mkdir(parents=True, exist_ok=True)
    servers = {name: Ensemble([name]) for name in s.server_models}
    geometries = sorted({zoo.spec(n).geometry for n in [s.client.probe, *s.server_models]})
    chunks, computed, start = [], 0, time.perf_counter()
    starts = range(0, len(files), s.batch)
    for i in tqdm(starts, desc="pairs (g, g~)", disable=not progress, unit="chunk"):
        path = folder / _chunk_name(i // s.batch, files[i:i + s.batch], root)
        chunk = _read_chunk(path)
        if chunk is None:
            chunk = _compute_chunk(face_batch(files[i:i + s.batch], landmarks, geometries), s, servers)
            with atomic_path(path) as tmp:
                torch.save(chunk, tmp)
            computed += 1
        chunks.append(chunk)
    pairs = Pairs(torch.cat([c["g"] for c in chunks]), torch.cat([c["g_tilde"] for c in chunks]),
                  {n: torch.cat([c["embeddings"][n] for c in chunks]) for n in s.server_models})
    info = {"cache": str(folder), "chunks": len(chunks), "computed_chunks": computed,
            "seconds": round(time.perf_counter() - start, 1)}
    return pairs, info


def _read_chunk(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache entry is recomputed
        return None


# --------------------------------------------------------------------------------------------- the training


class Trainer:
    """Runs the phases, writing the resume file after every epoch and one log line per epoch."""

    def __init__(self, root: Path, out: Path, s: TrainSettings, resume: bool = False, progress: bool = True):
        self.root, self.out, self.s, self.progress = root, Path(out), s.validate(), progress
        self.resume_path = self.out.with_name(self.out.name + ".resume.pt")
        self.log_path = self.out.with_name(self.out.name + ".log.jsonl")
        self.done = {phase: 0 for phase in PHASES}
        self.history: dict[str, list[float]] = {phase: [] for phase in PHASES}
        with torch.random.fork_rng():  # the initial weights come from the seed, not from the global RNG
            torch.manual_seed(s.seed)
            self.model = ApfServerModel(s.client.eps)
        self.optimizer_state: dict | None = None
        self.earlier_seconds = 0.0  # of the runs this one resumes
        self.started = time.perf_counter()
        if resume:
            self._load_resume()

    # -- resume file and log
    def _resume_settings(self) -> dict:
        d = self.s.as_dict()
        d.pop("epochs")  # more joint epochs may be asked of a resumed run
        return d

    def _load_resume(self) -> None:
        if not self.resume_path.is_file():
            raise FaceveilError(f"`resume`: no resume file {self.resume_path}")
        try:
            state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
            saved = json.loads(state["settings_json"])
        except Exception as exc:
            raise FaceveilError(f"{self.resume_path} is not a readable resume file ({type(exc).__name__})") from None
        if saved != json.loads(json.dumps(self._resume_settings())):
            raise FaceveilError(f"{self.resume_path} was made with other settings; run without `resume`")
        self.model = model_from_payload(state["model"], str(self.resume_path))
        self.done = {p: int(state["done"][p]) for p in PHASES}
        self.history = json.loads(state["history_json"])
        self.optimizer_state = state.get("optimizer")
        self.earlier_seconds = float(state["seconds"])

    def _save_resume(self, optimizer: torch.optim.Optimizer | None) -> None:
        state = {"settings_json": json.dumps(self._resume_settings()), "model": checkpoint_payload(self.model),
                 "done": dict(self.done), "history_json": json.dumps(self.history), "seconds": self.elapsed(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None}
        with atomic_path(self.resume_path) as tmp:
            torch.save(state, tmp)

    def log(self, **entry) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    def elapsed(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    # -- the run
    def run(self) -> dict:
        s = self.s
        files, data = training_files(self.root, s.images, s.seed, self.progress)
        self.files, self.landmarks = files, data.pop("landmarks")
        self.log(event="start", settings=s.as_dict(), data=data, resumed_from=dict(self.done))
        pairs, pair_info = precompute_pairs(files, self.landmarks, self.root, s, self.progress)
        self.log(event="pairs", **pair_info)
        self.pairs = pairs
        self.servers = Ensemble(s.server_models, s.weights())
        self.geometries = sorted({zoo.spec(n).geometry for n in s.server_models})
        before = {"transfer": self.transfer_loss(), "joint": self.joint_loss()}
        self._universal()
        phase_start = {"transfer": before["transfer"]}  # the universal phase leaves T as it was
        self._transfer()
        phase_start["joint"] = self.joint_loss()
        self._joint()
        after = {"transfer": self.transfer_loss(), "joint": self.joint_loss()}
        summary = {"images": data["images"], "identities": data["identities"],
                   "excluded_identities": data["excluded_identities"], "epochs": dict(self.done),
                   "loss_before": before, "loss_after": after, "loss_at_phase_start": phase_start,
                   "history": self.history,
                   "pairs_seconds": pair_info["seconds"], "seconds": round(self.elapsed(), 1), "seed": s.seed,
                   "dataset": "LFW, identities outside pairs.txt", "lr": s.lr, "batch": s.batch}
        self.model.meta.update(self._meta(summary))
        save_server_model(self.model, self.out)
        self.log(event="done", output=str(self.out), **{k: v for k, v in summary.items() if k != "history"})
        return summary

    def _meta(self, summary: dict) -> dict:
        s = self.s
        return {"server_models": s.server_models, "ensemble_weights": s.weights(), "probe": s.client.probe,
                "algorithm": s.client.algorithm, "algorithms": [s.client.algorithm],
                "client": dataclasses.asdict(s.client), "training": summary}

    def _minibatches(self, phase: str, epoch: int) -> Iterator[torch.Tensor]:
        """Seeded shuffled minibatch indices, the same for an epoch whether resumed or not."""
        gen = torch.Generator().manual_seed(self.s.seed * 1000 + PHASES.index(phase) * 100 + epoch)
        order = torch.randperm(len(self.files), generator=gen)
        yield from order.split(self.s.batch)

    def _faces(self, index: torch.Tensor) -> FaceBatch:
        return on_grid(face_batch([self.files[i] for i in index.tolist()], self.landmarks, self.geometries))

    def _epochs(self, phase: str, total: int) -> Iterator[int]:
        yield from tqdm(range(self.done[phase], total), desc=phase, disable=not self.progress, unit="epoch")

    # -- phase 2: u (Eq. 7)
    def _universal(self) -> None:
        s = self.s
        cfg = AttackConfig(eps=s.client.eps, alpha=s.client.step, steps=s.universal_steps,
                           momentum=s.client.momentum, seed=s.seed)
        for epoch in self._epochs("universal", s.universal_epochs):
            t0, distances = time.perf_counter(), []
            for index in self._minibatches("universal", epoch):
                faces = self._faces(index)
                u = run_attack(faces, self.servers, lambda emb, _s: -self.pairwise_distance(emb), cfg,
                               delta=self.model.universal.clone(), owner=torch.zeros(len(index), dtype=torch.long))
                self.model.universal.copy_(u)
                with torch.no_grad():
                    distances.append(float(self.pairwise_distance(
                        self.servers.embed(faces, faces.perturbed(u.expand(len(index), -1, -1, -1)))).mean()))
            self._end_epoch("universal", epoch, float(np.mean(distances)), t0, None, "mean pairwise distance")

    def pairwise_distance(self, emb: Embeddings) -> torch.Tensor:
        """Eq. 7's sum over j, as a mean [B]: each face's ensemble distance to every training face's clean one."""
        return pairwise_ensemble_distance(self.servers, emb, self.pairs.embeddings).mean(dim=1)

    # -- phase 3: T on Eq. 4
    def _transfer_batch_loss(self, index: torch.Tensor) -> torch.Tensor:
        g_hat = self.model.transfer(self.pairs.g[index], self.model.eps)
        diff = (g_hat - self.pairs.g_tilde[index]) / self.model.eps
        return diff.flatten(1).square().mean(dim=1).sqrt()  # ||g_hat - g~||_2 per face, in eps units (RMS)

    def _transfer(self) -> None:
        resume = self.done["joint"] == 0 and self.done["transfer"] > 0
        self._train_phase("transfer", self.model.transfer.parameters(), self.s.transfer_epochs,
                          self._transfer_batch_loss, resume, "RMS(T(g) - g~) / eps")

    def transfer_loss(self) -> float:
        return self._mean_loss("transfer", self._transfer_batch_loss)

    # -- phase 4: T and E on Eq. 9-10
    def _joint_batch_loss(self, index: torch.Tensor) -> torch.Tensor:
        faces = self._faces(index)
        s_noise = self.model(self.pairs.g[index])
        emb = self.servers.embed(faces, faces.perturbed(s_noise))
        reference = {n: e[index] for n, e in self.pairs.embeddings.items()}  # x_e = x
        return -ensemble_distance(self.servers, emb, reference)

    def _joint(self) -> None:
        self._train_phase("joint", self.model.parameters(), self.s.epochs, self._joint_batch_loss,
                          self.done["joint"] > 0, "-ensemble distance (Eq. 9)")

    def _train_phase(self, phase: str, parameters, epochs: int, batch_loss, resume: bool, what: str) -> None:
        """Adam on `batch_loss` over the phase's minibatches, an epoch at a time (resumable: the optimiser state of
        an interrupted run of this phase is restored when `resume`)."""
        optimizer = torch.optim.Adam(parameters, lr=self.s.lr)
        if self.optimizer_state is not None and resume:
            optimizer.load_state_dict(self.optimizer_state)
        for epoch in self._epochs(phase, epochs):
            t0, losses = time.perf_counter(), []
            self.model.train()
            for index in self._minibatches(phase, epoch):
                loss = batch_loss(index).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            self._end_epoch(phase, epoch, float(np.mean(losses)), t0, optimizer, what)

    def _mean_loss(self, phase: str, batch_loss) -> float:
        self.model.eval()
        with torch.no_grad():
            return float(torch.cat([batch_loss(i) for i in self._minibatches(phase, 0)]).mean())

    def joint_loss(self) -> float:
        return self._mean_loss("joint", self._joint_batch_loss)

    def _end_epoch(self, phase: str, epoch: int, value: float, t0: float, optimizer, what: str) -> None:
        seconds = time.perf_counter() - t0
        self.done[phase] = epoch + 1
        self.history[phase].append(round(value, 6))
        self._save_resume(optimizer)
        self.log(event="epoch", phase=phase, epoch=epoch + 1, value=round(value, 6), measure=what,
                 seconds=round(seconds, 1))


def train(root: Path, out: Path, settings: TrainSettings, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) and write the server model to `out`; returns the training summary."""
    return Trainer(root, out, settings, resume, progress).run()
