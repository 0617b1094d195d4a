"""Identity splits of a labelled face dataset (identity -> image files), seeded and deterministic. Here, so that
training (faceveil.methods) can keep its identities disjoint from an evaluation's without importing the evaluation.

`make_split`: the TIP-IM identification protocol's split (Yang et al., ICCV 2021, §5.1; run by
faceveil.evaluate.protocols.tip_im): protected identities (at least 2 images, up to 500) give one probe image each
and their other images to the gallery; 10 disjoint target identities (at least 2 images) give one image each to the
target set and the rest to the gallery; further disjoint identities (500, or 50 with a limit) add all their images;
every identity gives at most GALLERY_CAP (20) images to the gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PROTECTED = 500
TARGET_IDENTITIES = 10
EXTRA_IDENTITIES = 500
EXTRA_IDENTITIES_LIMITED = 50  # with --limit: quick runs stay quick
# At most this many gallery images per identity: LFW is skewed (George_W_Bush has 530 images), and one such target
# identity would fill the gallery's top ranks by sheer number (the paper's gallery: ~10 images per identity).
GALLERY_CAP = 20

Labelled = tuple[str, Path]  # (identity, image file)


@dataclass(frozen=True)
class Split:
    probes: list[Labelled]
    targets: list[Labelled]
    gallery: list[Labelled]
    extra_identities: int
    gallery_cap: int = GALLERY_CAP

    def counts(self) -> dict:
        return {"gallery_cap": self.gallery_cap, "protected_identities": len(self.probes),
                "target_identities": len(self.targets), "extra_identities": self.extra_identities,
                "gallery_images": len(self.gallery),
                "gallery_identities": len({name for name, _ in self.gallery})}


def make_split(people: dict[str, list[Path]], seed: int = 0, limit: int | None = None,
               extra: int | None = None, cap: int = GALLERY_CAP) -> Split:
    """The seeded protocol split (see the module docstring); identities are disjoint between the three roles, and
    every identity gives at most `cap` images to the gallery."""
    rng = np.random.default_rng(seed)
    order = [sorted(people)[i] for i in rng.permutation(len(people))]
    eligible = [n for n in order if len(people[n]) >= 2]
    n_protected = min(MAX_PROTECTED, limit or MAX_PROTECTED)
    protected = eligible[:n_protected]
    targets = eligible[n_protected:n_protected + TARGET_IDENTITIES]
    used = set(protected) | set(targets)
    n_extra = extra if extra is not None else (EXTRA_IDENTITIES if limit is None else EXTRA_IDENTITIES_LIMITED)
    extras = [n for n in order if n not in used][:n_extra]
    probes, gallery = [], []
    for name in protected:
        images = people[name]
        pick = int(rng.integers(len(images)))
        probes.append((name, images[pick]))
        gallery += [(name, p) for i, p in enumerate(images) if i != pick][:cap]
    gallery += [(name, p) for name in targets for p in people[name][1:1 + cap]]
    gallery += [(name, p) for name in extras for p in people[name][:cap]]
    return Split(probes, [(name, people[name][0]) for name in targets], gallery, len(extras), cap)
