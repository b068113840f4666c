"""Labelled image datasets for the lab: ImageFolder trees (class = first folder under the root), embedded
through the embedding cache, and the stable stratified train / held-out split that ``evaluate --split`` and
``finetune`` share (a fine-tuned model records its split, so an evaluation can tell which images it saw).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from ingest.lab.embedcache import EmbeddingCache, embed_refs
from ingest.sources import ImageRef, iter_refs
from search.config import Settings
from search.errors import ConfigError
from search.reading import local_path

if TYPE_CHECKING:
    from search.models import Embedder


def _say(message: str) -> None:
    click.echo(message, err=True)


@dataclass
class Dataset:
    """Embedded images of an ImageFolder tree (class = first folder under the root), sorted by path."""

    root: Path
    uris: list[str]
    keys: list[str]  # path relative to the root: stable split keys
    classes: list[str]
    sha256: list[str]
    vectors: np.ndarray
    computed: int = 0
    skipped: int = 0

    def subset(self, rows: np.ndarray) -> Dataset:
        rows = np.asarray(rows, dtype=np.int64)
        return Dataset(self.root, [self.uris[i] for i in rows], [self.keys[i] for i in rows],
                       [self.classes[i] for i in rows], [self.sha256[i] for i in rows], self.vectors[rows])

    def __len__(self) -> int:
        return len(self.uris)


def relative_key(path: Path, root: Path) -> Path | None:
    """``path`` relative to the dataset ``root`` (as walked, else with symlinks resolved); None if outside."""
    for candidate in (path, path.resolve()):
        try:
            return candidate.relative_to(root)
        except ValueError:
            continue
    return None


def image_folder_refs(root: Path) -> list[ImageRef]:
    """ImageRefs of an ImageFolder tree, labelled with their class folder; bad entries reported on stderr."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"dataset {root} is not a folder; give an ImageFolder tree (one folder per class)")
    refs = []
    loose = 0
    for ref in iter_refs([root], on_error=lambda where, why: _say(f"skipping {where}: {why}")):
        path = local_path(ref.uri)
        rel = relative_key(Path(path), root) if path is not None else None
        if rel is None:
            continue
        if len(rel.parts) < 2:
            loose += 1
            continue
        refs.append(ImageRef(ref.uri, (rel.parts[0],), "evaluate"))
    if loose:
        _say(f"skipping {loose} image(s) directly under {root}: an ImageFolder tree keeps each class in a folder")
    if not refs:
        raise ConfigError(f"no images found under {root} (expected ROOT/CLASS/IMAGE files)")
    return sorted(refs, key=lambda r: r.uri)


def load_dataset(root: Path, embedder: Embedder, settings: Settings, cache: EmbeddingCache | None, *,
                 progress: bool = True) -> Dataset:
    """Every decodable image of the ImageFolder tree at ``root``, embedded (cached vectors first)."""
    root = Path(root).expanduser().resolve()
    refs = image_folder_refs(root)
    emb = embed_refs(refs, embedder, settings, cache=cache, progress=progress)
    if not len(emb.uris):
        raise ConfigError(f"none of the {len(refs)} images under {root} could be decoded")
    keys = [(relative_key(Path(u), root) or Path(u)).as_posix() for u in emb.uris]
    return Dataset(root=root, uris=emb.uris, keys=keys, classes=[lab[0] for lab in emb.labels], sha256=emb.sha256,
                   vectors=emb.vectors, computed=emb.computed, skipped=len(emb.skipped))


def stratified_split(labels: Sequence[str], keys: Sequence[str], fraction: float, seed: int = 0) -> tuple[
        np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class: (train rows, held-out rows), both sorted.

    Deterministic and stable: inside a class, items are ordered by a hash of (seed, key) — key is e.g. the
    path relative to the dataset root — so adding a file does not reshuffle the others. Every class with
    at least 2 items keeps at least one item on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction {fraction} must be between 0 and 1")
    if len(labels) != len(keys):
        raise ValueError("labels and keys differ in length")
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    held: list[int] = []
    for rows in by_class.values():
        rows = sorted(rows, key=lambda i: hashlib.sha256(f"{seed}\0{keys[i]}".encode()).hexdigest())
        n = len(rows)
        take = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        held.extend(rows[:take])
    held_arr = np.array(sorted(held), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), held_arr)
    return train, held_arr


__all__ = ["Dataset", "image_folder_refs", "load_dataset", "relative_key", "stratified_split"]
