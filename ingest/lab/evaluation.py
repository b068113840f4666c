"""``evaluate``'s measurements for one model on an ImageFolder tree: the book protocol (every image queries
the rest), a held-out ``--split`` or separate ``--queries``; precision@4 (plain and class-balanced), top-1/top-5
kNN accuracy, mAP@10, per-class figures with each class's main confuser, auto-tag accuracy/coverage with the
Tagger's own rule, a PCA sweep, and optionally the ANN benchmark (ingest.lab.ann) and the near-duplicate test
(ingest.lab.nearduplicates).

Embeddings come from the embedding cache (ingest.lab.embedcache), so only the first pass over a dataset runs
the network. A fine-tuned model's recorded training split is honoured: queries it was trained on are dropped
(or, with every image querying the rest, a warning says how to measure honestly).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from ingest.lab.ann import store_figures
from ingest.lab.datasets import Dataset, load_dataset, stratified_split
from ingest.lab.embedcache import EmbeddingCache, open_cache
from ingest.lab.metrics import (
    VOTE_RULE,
    Retrieval,
    class_mean,
    confusions,
    encode_labels,
    pca_apply,
    pca_fit,
    per_class,
    percent,
    retrieve,
)
from ingest.lab.nearduplicates import near_duplicate_figures
from search.config import Settings
from search.models import Embedder, get_embedder, read_model_info


def _say(message: str) -> None:
    click.echo(message, err=True)


@dataclass
class ModelRun:
    """Everything measured for one model, plus what the plots need."""

    result: dict[str, Any]
    per_class_rows: list[dict[str, Any]] = field(default_factory=list)
    pca_rows: list[dict[str, Any]] = field(default_factory=list)
    map_points: tuple[np.ndarray, list[str]] | None = None


@dataclass
class _Split:
    """The index and the queries of one evaluation, with their class codes."""

    index: Dataset
    queries: Dataset
    mode: str
    exclude_self: bool
    images: int = 0  # every image loaded, before any drop
    index_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    query_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_names: list[str] = field(default_factory=list)

    def encode(self) -> None:
        codes, self.class_names = encode_labels([*self.index.classes, *self.queries.classes])
        self.index_codes, self.query_codes = codes[:len(self.index)], codes[len(self.index):]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def tag_figures(index_classes: Sequence[str], query_classes: Sequence[str], ids: np.ndarray, sims: np.ndarray, *,
                k: int, threshold: float, temperature: float | None = None) -> dict[str, float]:
    """Auto-tag accuracy (share of written tags that are right) and coverage (share of queries tagged),
    with the Tagger's own rule (ingest.tagging.vote) on the given neighbours."""
    from ingest.tagging import TAG_TEMPERATURE, vote

    temp = TAG_TEMPERATURE if temperature is None else temperature
    written = correct = tagged = 0
    for truth, row_ids, row_sims in zip(query_classes, ids[:, :k], sims[:, :k], strict=True):
        tags = vote([(index_classes[i],) for i in row_ids], row_sims.tolist(), threshold=threshold, temperature=temp)
        if tags:
            tagged += 1
        written += len(tags)
        correct += sum(1 for label, _, _ in tags if label == truth)
    n = len(query_classes)
    return {"tag_accuracy": 100.0 * correct / written if written else float("nan"),
            "tag_coverage": 100.0 * tagged / n if n else float("nan"), "tags_written": written}


def model_info(name: str, settings: Settings) -> dict[str, Any] | None:
    """``lookalike.json`` of a saved model (fine-tuned / reduced), if the name is one."""
    for candidate in (Path(name).expanduser(), Path(settings.data_dir) / "models" / name):
        if candidate.is_dir():
            return read_model_info(candidate)
    return None


def evaluate_model(name: str, settings: Settings, dataset: Path, *, queries_dir: Path | None, split: float | None,
                   seed: int, pca_dims: Sequence[int], ann: bool, quantizations: Sequence[str], near_duplicates: int,
                   worst: int, use_cache: bool, tag_threshold: float, progress: bool) -> ModelRun:
    """Every figure of ``lookalike evaluate`` for one model (see the module docstring)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    embedder = get_embedder(name, settings)
    cache = open_cache(embedder, settings, use_cache)
    t0 = time.perf_counter()
    data = load_dataset(dataset, embedder, settings, cache, progress=progress)
    sp, computed, skipped = _index_and_queries(data, embedder, settings, cache, queries_dir=queries_dir,
                                               split=split, seed=seed, progress=progress)
    timings["embed"] = time.perf_counter() - t0
    sp.queries = _unseen_queries(name, model_info(name, settings), sp)
    sp.encode()

    t0 = time.perf_counter()
    r = retrieve(sp.index.vectors, sp.index_codes, sp.queries.vectors, sp.query_codes, exclude_self=sp.exclude_self,
                 n_classes=sp.n_classes, k=max(10, settings.tag_k))
    timings["search"] = time.perf_counter() - t0
    result = _headline(name, embedder, sp, r, skipped=skipped, computed=computed)
    tags = tag_figures(sp.index.classes, sp.queries.classes, r.ids, r.sims, k=settings.tag_k,
                       threshold=tag_threshold)
    result.update(tag_accuracy=round(tags["tag_accuracy"], 2), tag_coverage=round(tags["tag_coverage"], 2),
                  tag_threshold=tag_threshold, tag_k=settings.tag_k)

    rows, confusers = _per_class_rows(sp, r)
    result["worst_classes"] = rows[:worst]
    run = ModelRun(result=result, per_class_rows=rows)

    t0 = time.perf_counter()
    run.pca_rows = [*_pca_sweep(sp, pca_dims, int(embedder.dim)),
                    {"dim": int(embedder.dim), "book_precision_at_4": result["book_precision_at_4"],
                     "top1": result["top1"], "map_at_10": result["map_at_10"]}]
    result["pca"] = run.pca_rows
    timings["pca"] = time.perf_counter() - t0

    if ann or quantizations:
        t0 = time.perf_counter()
        result["store"] = store_figures(sp.index.vectors, sp.index_codes, sp.queries.vectors, sp.query_codes, r.ids,
                                        exclude_self=sp.exclude_self, n_classes=sp.n_classes, meta=embedder.meta(),
                                        settings=settings, quantizations=["none", *quantizations])
        timings["store"] = time.perf_counter() - t0

    if near_duplicates:
        t0 = time.perf_counter()
        result["near_duplicates"] = near_duplicate_figures(data, embedder, cache, near_duplicates, seed, settings)
        timings["near_duplicates"] = time.perf_counter() - t0

    run.map_points = _map_points(sp, rows, confusers)
    timings["total"] = time.perf_counter() - t_start
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    if cache is not None:
        cache.close()
    return run


def _index_and_queries(data: Dataset, embedder: Embedder, settings: Settings, cache: EmbeddingCache | None, *,
                       queries_dir: Path | None, split: float | None, seed: int,
                       progress: bool) -> tuple[_Split, int, int]:
    """(index and queries, vectors computed, files skipped) for the chosen mode."""
    computed, skipped = data.computed, data.skipped
    if queries_dir is not None:
        queries = load_dataset(queries_dir, embedder, settings, cache, progress=progress)
        sp = _Split(data, queries, f"queries from {queries.root}", False, images=len(data) + len(queries))
        return sp, computed + queries.computed, skipped + queries.skipped
    if split is not None:
        train_rows, held_rows = stratified_split(data.classes, data.keys, split, seed)
        sp = _Split(data.subset(train_rows), data.subset(held_rows), f"held-out split {split:g} (seed {seed})",
                    False, images=len(data))
        return sp, computed, skipped
    return _Split(data, data, "all images query the rest", True, images=len(data)), computed, skipped


def _unseen_queries(name: str, info: dict[str, Any] | None, sp: _Split) -> Dataset:
    """The queries a fine-tuned model was not trained on (with every image querying the rest, all of them and
    a warning)."""
    queries = sp.queries
    trained_on = set((info or {}).get("split", {}).get("train_sha256") or [])
    seen = [i for i, sha in enumerate(queries.sha256) if sha in trained_on]
    if seen and sp.exclude_self:
        assert info is not None
        _say(f"warning: model {name} was trained on {len(seen)} of these images; for an honest figure use "
             f"--split {info['split'].get('fraction')} --seed {info['split'].get('seed')}")
    elif seen:
        _say(f"note: dropping {len(seen)} queries that model {name} was trained on (its split differs from "
             f"--split/--seed); the figures use only images it never saw")
        queries = queries.subset(np.setdiff1d(np.arange(len(queries)), seen))
    return queries


def _headline(name: str, embedder: Embedder, sp: _Split, r: Retrieval, *, skipped: int,
              computed: int) -> dict[str, Any]:
    return {
        "model": name, "dim": int(embedder.dim), "preprocessing": embedder.preprocessing, "mode": sp.mode,
        "images": sp.images, "index": len(sp.index),
        "queries": len(sp.queries), "classes": sp.n_classes, "skipped": skipped, "embedded_now": computed,
        "book_precision_at_4": percent(r.p4.mean()),
        "class_balanced_precision_at_4": percent(class_mean(r.p4, sp.query_codes)),
        "top1": percent(r.top1.mean()), "top5": percent(r.top5.mean()), "map_at_10": percent(r.ap10.mean()),
        "vote": VOTE_RULE,
    }


def _per_class_rows(sp: _Split, r: Retrieval) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Per-class figures, worst first, and each class's main confuser (-1 for none)."""
    p4c, t1c = per_class(r.p4, sp.query_codes), per_class(r.top1, sp.query_codes)
    counts = np.bincount(sp.query_codes, minlength=sp.n_classes)
    confusers = confusions(sp.query_codes, sp.index_codes[r.ids[:, :4]], sp.n_classes)
    names = sp.class_names
    rows = sorted(({"class": names[c], "queries": int(counts[c]), "precision_at_4": percent(p4c[c]),
                    "top1": percent(t1c[c]),
                    "confused_with": names[confusers[c]] if confusers[c] >= 0 else None} for c in p4c),
                  key=lambda row: (row["precision_at_4"], row["class"]))
    return rows, confusers


def _pca_sweep(sp: _Split, pca_dims: Sequence[int], dim: int) -> list[dict[str, Any]]:
    """The headline figures after a PCA to each of ``pca_dims``, fitted on the index part only."""
    dims = [d for d in pca_dims if d < dim and d <= len(sp.index)]
    if not dims:
        return []
    rows = []
    mean, all_comps = pca_fit(sp.index.vectors, max(dims))  # components are nested: one fit serves every dim
    for d in dims:
        comps = all_comps[:d]
        ri = pca_apply(sp.index.vectors, mean, comps)
        rq = ri if sp.exclude_self else pca_apply(sp.queries.vectors, mean, comps)
        pr = retrieve(ri, sp.index_codes, rq, sp.query_codes, exclude_self=sp.exclude_self, n_classes=sp.n_classes)
        rows.append({"dim": d, "book_precision_at_4": percent(pr.p4.mean()), "top1": percent(pr.top1.mean()),
                     "map_at_10": percent(pr.ap10.mean())})
    return rows


def _map_points(sp: _Split, rows: list[dict[str, Any]],
                confusers: np.ndarray) -> tuple[np.ndarray, list[str]] | None:
    """Index images of the 5 worst classes and the classes they are confused with, for the 2-D map."""
    worst_codes = [sp.class_names.index(row["class"]) for row in rows[:5]]
    shown = list(dict.fromkeys([*worst_codes, *(int(confusers[c]) for c in worst_codes if confusers[c] >= 0)]))
    mask = np.isin(sp.index_codes, shown)
    if mask.sum() < 5:
        return None
    return sp.index.vectors[mask], [sp.class_names[c] for c in sp.index_codes[mask]]


__all__ = ["ModelRun", "evaluate_model", "model_info", "tag_figures"]
