"""Experiment commands: ``evaluate`` (retrieval quality of one or more models on an ImageFolder tree),
``finetune`` (a projection head or PCA on frozen, cached embeddings, saved as a named model) and ``tag``
(re-tag stored points from their labelled neighbours, resumably).

Embeddings are cached per model (ingest.embedcache), so only the first pass over a dataset runs the network.
Results go to stdout (a table, or ``--json``); progress and skipped files go to stderr.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from search.cli import AppContext, echo_json, handle_errors, pass_app
from search.config import Settings
from search.errors import ConfigError
from search.evaluate import (
    VOTE_K,
    VOTE_TEMPERATURE,
    average_precision_at_k,
    class_mean,
    encode_labels,
    knn_topk_hits,
    nearest,
    pca_apply,
    pca_fit,
    per_class,
    precision_at_k,
    recall_at_k,
    relevant_counts,
    stratified_split,
)

if TYPE_CHECKING:
    from ingest.embedcache import EmbeddingCache
    from search.models import Embedder

PCA_DIMS = (16, 32, 64, 128, 256, 512)
VOTE_RULE = f"similarity-weighted vote of the {VOTE_K} nearest (softmax over cosine, T={VOTE_TEMPERATURE})"


def _say(message: str) -> None:
    click.echo(message, err=True)


# ---------------------------------------------------------------------------------------------- datasets
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


def image_folder_refs(root: Path) -> list[Any]:
    """ImageRefs of an ImageFolder tree, labelled with their class folder; bad entries reported on stderr."""
    from ingest.sources import ImageRef, iter_refs
    from search.reading import local_path

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
    from ingest.embedcache import embed_refs

    root = Path(root).expanduser().resolve()
    refs = image_folder_refs(root)
    emb = embed_refs(refs, embedder, settings, cache=cache, progress=progress)
    if not len(emb.uris):
        raise ConfigError(f"none of the {len(refs)} images under {root} could be decoded")
    keys = [(relative_key(Path(u), root) or Path(u)).as_posix() for u in emb.uris]
    return Dataset(root=root, uris=emb.uris, keys=keys, classes=[lab[0] for lab in emb.labels], sha256=emb.sha256,
                   vectors=emb.vectors, computed=emb.computed, skipped=len(emb.skipped))


def open_cache(embedder: Embedder, settings: Settings, enabled: bool) -> EmbeddingCache | None:
    from ingest.embedcache import EmbeddingCache

    return EmbeddingCache.for_embedder(embedder, settings) if enabled else None


def model_info(name: str, settings: Settings) -> dict[str, Any] | None:
    """``lookalike.json`` of a saved model (fine-tuned / reduced), if the name is one."""
    from ingest.finetune import read_info

    for candidate in (Path(name).expanduser(), Path(settings.data_dir) / "models" / name):
        if candidate.is_dir():
            return read_info(candidate)
    return None


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class Retrieval:
    """Neighbours of every query in the index, and the per-query metrics derived from them."""

    ids: np.ndarray
    sims: np.ndarray
    p4: np.ndarray
    top1: np.ndarray
    top5: np.ndarray
    ap10: np.ndarray


def retrieve(index: np.ndarray, index_codes: np.ndarray, queries: np.ndarray, query_codes: np.ndarray, *,
             exclude_self: bool, n_classes: int, k: int = 10) -> Retrieval:
    ids, sims = nearest(index, queries, max(k, VOTE_K, 10), exclude_self=exclude_self)
    labels = index_codes[ids]
    return Retrieval(
        ids=ids, sims=sims,
        p4=precision_at_k(query_codes, labels, 4),
        top1=knn_topk_hits(query_codes, labels, sims, topk=1, n_classes=n_classes),
        top5=knn_topk_hits(query_codes, labels, sims, topk=5, n_classes=n_classes),
        ap10=average_precision_at_k(query_codes, labels,
                                    relevant_counts(query_codes, index_codes, exclude_self=exclude_self), 10),
    )


def confusions(query_codes: np.ndarray, neighbour_codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class: the other class most often among its queries' neighbours (-1 when none)."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(query_codes, neighbour_codes.shape[1]), neighbour_codes.ravel()), 1)
    np.fill_diagonal(counts, 0)
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), -1)


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


def _pct(x: float) -> float:
    return round(100.0 * float(x), 2)


@dataclass
class ModelRun:
    """Everything measured for one model, plus what the plots need."""

    result: dict[str, Any]
    per_class_rows: list[dict[str, Any]] = field(default_factory=list)
    pca_rows: list[dict[str, Any]] = field(default_factory=list)
    map_points: tuple[np.ndarray, list[str]] | None = None


def evaluate_model(name: str, settings: Settings, dataset: Path, *, queries_dir: Path | None, split: float | None,
                   seed: int, pca_dims: Sequence[int], ann: bool, quantizations: Sequence[str], near_duplicates: int,
                   worst: int, use_cache: bool, tag_threshold: float, progress: bool) -> ModelRun:
    from ingest.finetune import resolve_embedder

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    embedder = resolve_embedder(name, settings)
    cache = open_cache(embedder, settings, use_cache)
    t0 = time.perf_counter()
    data = load_dataset(dataset, embedder, settings, cache, progress=progress)
    computed, skipped = data.computed, data.skipped
    info = model_info(name, settings)
    trained_on = set((info or {}).get("split", {}).get("train_sha256") or [])

    if queries_dir is not None:
        index, queries = data, load_dataset(queries_dir, embedder, settings, cache, progress=progress)
        computed += queries.computed
        skipped += queries.skipped
        mode, exclude_self = f"queries from {queries.root}", False
    elif split is not None:
        train_rows, held_rows = stratified_split(data.classes, data.keys, split, seed)
        index, queries = data.subset(train_rows), data.subset(held_rows)
        mode, exclude_self = f"held-out split {split:g} (seed {seed})", False
    else:
        index = queries = data
        mode, exclude_self = "all images query the rest", True
    timings["embed"] = time.perf_counter() - t0

    n_images = len(data) + (len(queries) if queries_dir is not None else 0)  # every image loaded, before any drop
    seen = [i for i, sha in enumerate(queries.sha256) if sha in trained_on]
    if seen and exclude_self:
        _say(f"warning: model {name} was trained on {len(seen)} of these images; for an honest figure use "
             f"--split {info['split'].get('fraction')} --seed {info['split'].get('seed')}")
    elif seen:
        _say(f"note: dropping {len(seen)} queries that model {name} was trained on (its split differs from "
             f"--split/--seed); the figures use only images it never saw")
        queries = queries.subset(np.setdiff1d(np.arange(len(queries)), seen))

    codes_all, class_names = encode_labels([*index.classes, *queries.classes])
    index_codes, query_codes = codes_all[:len(index)], codes_all[len(index):]
    n_classes = len(class_names)

    t0 = time.perf_counter()
    r = retrieve(index.vectors, index_codes, queries.vectors, query_codes, exclude_self=exclude_self,
                 n_classes=n_classes, k=max(10, settings.tag_k))
    timings["search"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "model": name, "dim": int(embedder.dim), "preprocessing": embedder.preprocessing, "mode": mode,
        "images": n_images, "index": len(index),
        "queries": len(queries), "classes": n_classes, "skipped": skipped, "embedded_now": computed,
        "book_precision_at_4": _pct(r.p4.mean()),
        "class_balanced_precision_at_4": _pct(class_mean(r.p4, query_codes)),
        "top1": _pct(r.top1.mean()), "top5": _pct(r.top5.mean()), "map_at_10": _pct(r.ap10.mean()),
        "vote": VOTE_RULE,
    }
    tags = tag_figures(index.classes, queries.classes, r.ids, r.sims, k=settings.tag_k, threshold=tag_threshold)
    result.update(tag_accuracy=round(tags["tag_accuracy"], 2), tag_coverage=round(tags["tag_coverage"], 2),
                  tag_threshold=tag_threshold, tag_k=settings.tag_k)

    # per class, worst first
    p4c, t1c = per_class(r.p4, query_codes), per_class(r.top1, query_codes)
    counts = np.bincount(query_codes, minlength=n_classes)
    confusers = confusions(query_codes, index_codes[r.ids[:, :4]], n_classes)
    rows = sorted(({"class": class_names[c], "queries": int(counts[c]), "precision_at_4": _pct(p4c[c]),
                    "top1": _pct(t1c[c]),
                    "confused_with": class_names[confusers[c]] if confusers[c] >= 0 else None} for c in p4c),
                  key=lambda row: (row["precision_at_4"], row["class"]))
    result["worst_classes"] = rows[:worst]
    run = ModelRun(result=result, per_class_rows=rows)

    # PCA sweep, fitted on the index part only
    t0 = time.perf_counter()
    dims = [d for d in pca_dims if d < embedder.dim and d <= len(index)]
    if dims:  # components are nested: one fit at the largest dimension serves every smaller one
        mean, all_comps = pca_fit(index.vectors, max(dims))
    for dim in dims:
        comps = all_comps[:dim]
        ri = pca_apply(index.vectors, mean, comps)
        rq = ri if exclude_self else pca_apply(queries.vectors, mean, comps)
        pr = retrieve(ri, index_codes, rq, query_codes, exclude_self=exclude_self, n_classes=n_classes)
        run.pca_rows.append({"dim": dim, "book_precision_at_4": _pct(pr.p4.mean()), "top1": _pct(pr.top1.mean()),
                             "map_at_10": _pct(pr.ap10.mean())})
    run.pca_rows.append({"dim": int(embedder.dim), "book_precision_at_4": result["book_precision_at_4"],
                         "top1": result["top1"], "map_at_10": result["map_at_10"]})
    result["pca"] = run.pca_rows
    timings["pca"] = time.perf_counter() - t0

    if ann or quantizations:
        t0 = time.perf_counter()
        result["store"] = store_figures(index.vectors, index_codes, queries.vectors, query_codes, r.ids,
                                        exclude_self=exclude_self, n_classes=n_classes, meta=embedder.meta(),
                                        settings=settings, quantizations=["none", *quantizations])
        timings["store"] = time.perf_counter() - t0

    if near_duplicates:
        t0 = time.perf_counter()
        result["near_duplicates"] = near_duplicate_figures(data, embedder, cache, near_duplicates, seed, settings)
        timings["near_duplicates"] = time.perf_counter() - t0

    # 2-D map of the worst classes and the classes they are confused with (index images of both)
    worst_codes = [class_names.index(row["class"]) for row in rows[:5]]
    shown = list(dict.fromkeys([*worst_codes, *(int(confusers[c]) for c in worst_codes if confusers[c] >= 0)]))
    mask = np.isin(index_codes, shown)
    if mask.sum() >= 5:
        run.map_points = (index.vectors[mask], [class_names[c] for c in index_codes[mask]])
    timings["total"] = time.perf_counter() - t_start
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    if cache is not None:
        cache.close()
    return run


def store_figures(index: np.ndarray, index_codes: np.ndarray, queries: np.ndarray, query_codes: np.ndarray,
                  exact_ids: np.ndarray, *, exclude_self: bool, n_classes: int, meta: Any, settings: Settings,
                  quantizations: Sequence[str], k: int = 10, latency_sample: int = 200) -> list[dict[str, Any]]:
    """Exact vs HNSW (and quantized HNSW) through a real embedded store on a temporary data dir:
    recall@10 against exact numpy search, accuracy through the store's results, build time, latency."""
    from search.schema import PointRecord
    from search.store import open_store

    out = []
    ids = [str(uuid.uuid5(uuid.NAMESPACE_OID, f"row-{i}")) for i in range(len(index))]
    row_of = {pid: i for i, pid in enumerate(ids)}
    for quant in dict.fromkeys(quantizations):
        with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
            s = dataclasses.replace(settings, data_dir=Path(tmp), qdrant_url=None, collection="evaluate",
                                    quantization=quant)
            store = open_store(s)
            try:
                store.ensure_collection(dataclasses.replace(meta, model=f"evaluate:{meta.model}"))
                t0 = time.perf_counter()
                with store.bulk():
                    for start in range(0, len(index), 1024):
                        store.upsert([PointRecord(pid, index[i], {}) for i, pid in
                                      enumerate(ids[start:start + 1024], start)])
                t_upsert = time.perf_counter() - t0
                t0 = time.perf_counter()
                store.optimize(force=True)
                t_build = time.perf_counter() - t0

                approx_rows, approx_scores, t_approx = _ranked(store, queries, k, row_of, exclude_self, False)
                exact_rows, _, t_exact = _ranked(store, queries, k, row_of, exclude_self, True)
                rng = np.random.default_rng(0)
                sample = rng.choice(len(queries), size=min(latency_sample, len(queries)), replace=False)
                single = []
                for q in sample:
                    t = time.perf_counter()
                    store.search(queries[q], k=k)
                    single.append(time.perf_counter() - t)
                labels = index_codes[np.maximum(approx_rows, 0)]
                out.append({
                    "quantization": quant,
                    "recall_at_10_hnsw": round(recall_at_k(approx_rows, exact_ids[:, :k], k), 4),
                    "recall_at_10_store_exact": round(recall_at_k(exact_rows, exact_ids[:, :k], k), 4),
                    "book_precision_at_4": _pct(precision_at_k(query_codes, labels, 4).mean()),
                    "top1": _pct(knn_topk_hits(query_codes, labels, approx_scores, topk=1,
                                               n_classes=n_classes).mean()),
                    "upsert_s": round(t_upsert, 2), "build_s": round(t_build, 2),
                    "batch_ms_per_query_hnsw": round(1000 * t_approx / max(len(queries), 1), 3),
                    "batch_ms_per_query_exact": round(1000 * t_exact / max(len(queries), 1), 3),
                    "single_query_p50_ms": round(1000 * float(np.median(single)), 3),
                    "single_query_p95_ms": round(1000 * float(np.percentile(single, 95)), 3),
                })
            finally:
                store.close()
    return out


def _ranked(store: Any, queries: np.ndarray, k: int, row_of: dict[str, int], exclude_self: bool,
            exact: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Store search for all queries: (index rows, scores, seconds); -1 pads missing results."""
    t = time.perf_counter()
    hits = store.search(queries, k=k + (1 if exclude_self else 0), exact=exact)
    secs = time.perf_counter() - t
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -1.0, dtype=np.float32)
    for q, hs in enumerate(hits):
        hs = [h for h in hs if not (exclude_self and row_of[h.id] == q)][:k]
        rows[q, :len(hs)] = [row_of[h.id] for h in hs]
        scores[q, :len(hs)] = [h.score for h in hs]
    return rows, scores, secs


# ---------------------------------------------------------------------------------------------- near-duplicates
def altered_copy(image: Any, rng: np.random.Generator) -> bytes:
    """A deterministic edited copy: rotation ±10°, crop to 70–90 % of the area, colour jitter, JPEG quality 40."""
    import io

    from PIL import Image, ImageEnhance

    image = image.convert("RGB")
    angle = float(rng.uniform(-10, 10))
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(128, 128, 128))
    w, h = image.size
    area = float(rng.uniform(0.70, 0.90))
    aspect = float(rng.uniform(0.9, 1.1))
    cw = max(8, min(w, round(w * math.sqrt(area) * aspect)))
    ch = max(8, min(h, round(w * h * area / cw)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.8, 1.2)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=40)
    return buf.getvalue()


NEAR_COPY_COSINE = 0.95  # two *originals* this similar are frames of one video / re-saved or re-cropped copies


def near_duplicate_figures(data: Dataset, embedder: Embedder, cache: EmbeddingCache | None, n: int,
                           seed: int, settings: Settings) -> dict[str, Any]:
    """Rank of each altered copy's original among all images.

    The original counts as found when the hit is the original itself or a copy of the same picture: the same
    bytes, the same vector, or the same pixels up to JPEG noise (mean absolute difference ≤ 2 at the same size).
    ``rank1_unique`` repeats the figure for originals without a near copy in the set (no other image within
    cosine ``NEAR_COPY_COSINE``): where the set holds consecutive video frames or the same photo cropped twice
    (Caltech's Leopards, Faces/Faces_easy), no global descriptor can tell which of them was altered.
    """
    from ingest.embedcache import embed_images
    from search.images import decode
    from search.reading import read_bytes
    from search.schema import sha256_hex

    def pixels(i: int) -> np.ndarray:
        image = decode(read_bytes(data.uris[i], settings), data.uris[i], max_pixels=settings.max_pixels).image
        return np.asarray(image, dtype=np.int16)

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data), size=min(n, len(data)), replace=False)
    items = []
    for i in picks:
        original = decode(read_bytes(data.uris[i], settings), data.uris[i], max_pixels=settings.max_pixels).image
        blob = altered_copy(original, np.random.default_rng([seed, int(i)]))
        image = decode(blob, f"altered:{data.keys[i]}", max_pixels=settings.max_pixels).image
        items.append((f"altered:{sha256_hex(blob)}", image))
    vectors, computed = embed_images(items, embedder, cache=cache)
    ids, _ = nearest(data.vectors, vectors, 10)
    # the originals' own nearest other image: is there a near copy of it in the set?
    own_ids, own_sims = nearest(data.vectors, data.vectors[picks], 2)
    ranks, unique = [], []
    for row, original, own_row, own_sim in zip(ids, picks, own_ids, own_sims, strict=True):
        def same(j: int, original: int = int(original)) -> bool:
            if j == original or data.sha256[j] == data.sha256[original]:
                return True
            if float(data.vectors[j] @ data.vectors[original]) < NEAR_COPY_COSINE:
                return False  # cheap reject before decoding
            a, b = pixels(j), pixels(original)
            return a.shape == b.shape and float(np.abs(a - b).mean()) <= 2.0
        hit = next((rank for rank, j in enumerate(row, 1) if same(int(j))), None)
        ranks.append(hit or 11)
        sibling = next((float(s) for j, s in zip(own_row, own_sim, strict=True) if int(j) != int(original)), 0.0)
        unique.append(sibling < NEAR_COPY_COSINE or same(int(next(j for j in own_row if int(j) != int(original)))))
    ranks_arr, unique_arr = np.array(ranks), np.array(unique, dtype=bool)
    return {"copies": len(picks), "rank1": _pct((ranks_arr == 1).mean()), "top10": _pct((ranks_arr <= 10).mean()),
            "unique_originals": int(unique_arr.sum()),
            "rank1_unique": _pct((ranks_arr[unique_arr] == 1).mean()) if unique_arr.any() else None,
            "embedded_now": computed,
            "alterations": "rotate ±10°, crop 70–90 % area, brightness/contrast/saturation ±20 %, JPEG q40"}


# ---------------------------------------------------------------------------------------------- report
def write_report(out: Path, runs: list[ModelRun], command: str) -> list[Path]:
    """report.md and PNG plots (matplotlib Agg) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        dims = [row["dim"] for row in run.pca_rows]
        ax.plot(dims, [row["book_precision_at_4"] for row in run.pca_rows], marker="o", label=run.result["model"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dimensions (PCA fitted on the index)")
    ax.set_ylabel("book precision@4 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "pca.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    for n, run in enumerate(runs):
        slug = f"{n}-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.result["model"])
        worst = run.per_class_rows[:15]
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(worst) + 1))
        ax.barh([row["class"] for row in worst][::-1], [row["precision_at_4"] for row in worst][::-1])
        ax.set_xlabel("precision@4 (%)")
        ax.set_title(f"worst classes — {run.result['model']}", fontsize=9)
        fig.tight_layout()
        files.append(out / f"worst-{slug}.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
        if run.map_points is not None:
            files.append(out / f"map-{slug}.png")
            _plot_map(*run.map_points, files[-1], run.result["model"])

    lines = ["# lookalike evaluate", "", f"Command: `{command}`", "",
             f"kNN accuracy: {VOTE_RULE}. Percentages.", "",
             "| model | dim | mode | images | queries | book P@4 | class-bal. P@4 | top-1 | top-5 | mAP@10 "
             "| tag acc. | tag cov. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = run.result
        lines.append(f"| {r['model']} | {r['dim']} | {r['mode']} | {r['images']} | {r['queries']} | "
                     f"{r['book_precision_at_4']:.2f} | {r['class_balanced_precision_at_4']:.2f} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {r['map_at_10']:.2f} | {r['tag_accuracy']:.2f} | {r['tag_coverage']:.2f} |")
    for n, run in enumerate(runs):
        r = run.result
        lines += ["", f"## {r['model']}", "", f"Preprocessing `{r['preprocessing']}`; auto-tags: k={r['tag_k']}, "
                  f"threshold {r['tag_threshold']}. Seconds: {_seconds(r['seconds'])}.", "",
                  "### Worst classes", "", "| class | queries | P@4 | top-1 | most confused with |",
                  "|---|---|---|---|---|"]
        lines += [f"| {row['class']} | {row['queries']} | {row['precision_at_4']:.1f} | {row['top1']:.1f} | "
                  f"{row['confused_with'] or '-'} |" for row in r["worst_classes"]]
        lines += ["", "### PCA", "", "| dims | book P@4 | top-1 | mAP@10 |", "|---|---|---|---|"]
        lines += [f"| {row['dim']} | {row['book_precision_at_4']:.2f} | {row['top1']:.2f} | {row['map_at_10']:.2f} |"
                  for row in run.pca_rows]
        if r.get("store"):
            lines += ["", "### Exact vs HNSW (embedded store)", "",
                      "| quantization | recall@10 HNSW | book P@4 (store) | top-1 (store) | build s | "
                      "ms/query batch HNSW | ms/query batch exact | single p50 ms | single p95 ms |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {s['quantization']} | {s['recall_at_10_hnsw']:.4f} | {s['book_precision_at_4']:.2f} | "
                      f"{s['top1']:.2f} | {s['build_s']} | {s['batch_ms_per_query_hnsw']} | "
                      f"{s['batch_ms_per_query_exact']} | {s['single_query_p50_ms']} | {s['single_query_p95_ms']} |"
                      for s in r["store"]]
        if r.get("near_duplicates"):
            nd = r["near_duplicates"]
            lines += ["", f"### Near-duplicates ({nd['alterations']})", "",
                      f"{nd['copies']} altered copies: original (or a pixel-identical copy) at rank 1 in "
                      f"{nd['rank1']:.2f} %, in the top 10 in {nd['top10']:.2f} %; for the {nd['unique_originals']} "
                      f"originals without a near copy in the set (cosine < {NEAR_COPY_COSINE}): rank 1 in "
                      f"{nd['rank1_unique'] or 0:.2f} %."]
        slug = f"{n}-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in r["model"])
        lines += ["", f"![worst classes](worst-{slug}.png)"]
        if run.map_points is not None:
            lines += [f"![map of the worst classes](map-{slug}.png)"]
    lines += ["", "![PCA](pca.png)", ""]
    files.append(out / "report.md")
    files[-1].write_text("\n".join(lines), encoding="utf-8")
    return files


def _plot_map(vectors: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    if len(vectors) > 30:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=0,
                  perplexity=min(30.0, (len(vectors) - 1) / 3)).fit_transform(vectors)
        how = "t-SNE"
    else:
        mean, comps = pca_fit(vectors, 2)
        xy = pca_apply(vectors, mean, comps, normalize=False)
        how = "PCA"
    fig, ax = plt.subplots(figsize=(6, 5))
    for name in sorted(set(classes)):
        m = np.array([c == name for c in classes])
        ax.scatter(xy[m, 0], xy[m, 1], s=10, label=name)
    ax.legend(fontsize=6, markerscale=1.5)
    ax.set_title(f"{how} of the 5 worst classes and their confusers — {title}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seconds(timings: dict[str, float]) -> str:
    """``{"embed": 0.01, "search": 0.0}`` → ``embed 0.01 s, search 0.00 s``."""
    return ", ".join(f"{step.replace('_', ' ')} {secs:.2f} s" for step, secs in timings.items())


def _table(runs: list[ModelRun]) -> None:
    # the figures are averages over the queries (all images, the held-out part, or --queries), so count those
    head = f"{'model':<40} {'queries':>7} {'P@4':>6} {'bal.':>6} {'top1':>6} {'top5':>6} {'mAP10':>6} " \
           f"{'tagacc':>6} {'tagcov':>6}"
    click.echo(head)
    for run in runs:
        r = run.result
        click.echo(f"{r['model'][:40]:<40} {r['queries']:>7} {r['book_precision_at_4']:>6.2f} "
                   f"{r['class_balanced_precision_at_4']:>6.2f} {r['top1']:>6.2f} {r['top5']:>6.2f} "
                   f"{r['map_at_10']:>6.2f} {r['tag_accuracy']:>6.2f} {r['tag_coverage']:>6.2f}")
    for run in runs:
        r = run.result
        click.echo(f"\n{r['model']} — {r['mode']}; {r['queries']} queries, index {r['index']}; {r['vote']}")
        click.echo("  worst classes (P@4, most confused with): " + ", ".join(
            f"{w['class']} {w['precision_at_4']:.0f} ({w['confused_with'] or '-'})" for w in r["worst_classes"]))
        click.echo("  PCA: " + ", ".join(f"{p['dim']}→{p['book_precision_at_4']:.2f}" for p in r["pca"]))
        for s in r.get("store", []):
            click.echo(f"  store quantization={s['quantization']}: recall@10 HNSW {s['recall_at_10_hnsw']:.4f}, "
                       f"top-1 {s['top1']:.2f}, P@4 {s['book_precision_at_4']:.2f}, build {s['build_s']} s, "
                       f"single query p50 {s['single_query_p50_ms']} ms")
        if r.get("near_duplicates"):
            nd = r["near_duplicates"]
            click.echo(f"  near-duplicates: {nd['copies']} copies, rank-1 {nd['rank1']:.2f} %, "
                       f"top-10 {nd['top10']:.2f} %; originals without a near copy in the set "
                       f"({nd['unique_originals']}): rank-1 {nd['rank1_unique'] or 0:.2f} %")
        click.echo(f"  seconds: {_seconds(r['seconds'])}")


def _dims(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give dimensions like 16,64,256") from None


# ---------------------------------------------------------------------------------------------- commands
@click.command("evaluate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "-m", "models", multiple=True,
              help="Model to evaluate (repeat for a comparison table); default: the global --model.")
@click.option("--split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Hold out this fraction of every class as queries against the rest (e.g. 0.33).")
@click.option("--seed", type=int, default=0, help="Seed of the stratified --split.")
@click.option("--queries", "queries_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A separate ImageFolder tree queried against DATASET as the index.")
@click.option("--pca", "pca_dims", default=",".join(map(str, PCA_DIMS)), callback=lambda c, p, v: _dims(v),
              help="PCA dimensions to sweep (empty to skip).")
@click.option("--ann/--no-ann", default=True, help="Compare exact and HNSW search in a temporary embedded store.")
@click.option("--quantization", "quantizations", multiple=True, type=click.Choice(["int8", "binary"]),
              help="Also measure the store with this vector quantization (repeatable).")
@click.option("--near-duplicates", type=int, default=0, help="Also test N altered copies (crop, rotate, jitter, "
              "JPEG q40): is the original found at rank 1?")
@click.option("--tag-threshold", type=click.FloatRange(0, 1), default=None,
              help="Auto-tag confidence threshold to evaluate [default: LOOKALIKE_TAG_THRESHOLD].")
@click.option("--worst", type=int, default=10, help="How many of the worst classes to list.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write report.md and PNG plots here.")
@click.option("--cache/--no-cache", "use_cache", default=True, help="Use the embedding cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model on stdout.")
@pass_app
@handle_errors
def evaluate_cmd(app: AppContext, dataset: Path, models: tuple[str, ...], split: float | None, seed: int,
                 queries_dir: Path | None, pca_dims: list[int], ann: bool, quantizations: tuple[str, ...],
                 near_duplicates: int, tag_threshold: float | None, worst: int, out: Path | None, use_cache: bool,
                 as_json: bool) -> None:
    """Retrieval quality of one or more models on an ImageFolder tree (one folder per class).

    Reports the book protocol (every image queries the rest; share of its 4 nearest other images in its
    class), its class-balanced version, top-1/top-5 kNN accuracy, mAP@10, per-class figures, auto-tag
    accuracy/coverage, a PCA sweep and exact-vs-HNSW search. Embeddings are cached: re-runs are fast.
    """
    if split is not None and queries_dir is not None:
        raise click.UsageError("use either --split or --queries, not both")
    settings = app.settings()
    names = list(models) or [settings.model]
    threshold = settings.tag_threshold if tag_threshold is None else tag_threshold
    runs = []
    for name in names:
        _say(f"evaluating {name} on {dataset}")
        runs.append(evaluate_model(name, settings, dataset, queries_dir=queries_dir, split=split, seed=seed,
                                   pca_dims=pca_dims, ann=ann, quantizations=quantizations,
                                   near_duplicates=near_duplicates, worst=worst, use_cache=use_cache,
                                   tag_threshold=threshold, progress=True))
    if out is not None:
        files = write_report(out, runs, "lookalike " + " ".join(sys.argv[1:]))
        _say(f"wrote {', '.join(str(f) for f in files)}")
    if as_json:
        echo_json([_clean(run.result) for run in runs])
    else:
        _table(runs)


def _clean(value: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@click.command("finetune")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Save the model as DATA_DIR/models/NAME (then --model NAME).")
@click.option("--base", default=None, help="Base model [default: the global --model].")
@click.option("--split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.33,
              help="Fraction of every class held out (never seen in training) to measure before/after.")
@click.option("--seed", type=int, default=0, help="Seed of the stratified split.")
@click.option("--pca", "pca_dim", type=int, default=None, help="Reduce to this many dimensions with PCA "
              "(fitted on the training split); without --head only the PCA is saved.")
@click.option("--head/--no-head", default=None, help="Train a projection head [default: yes, unless --pca].")
@click.option("--dim", type=int, default=None, help="Output dimension of the head [default: its input's].")
@click.option("--loss", type=click.Choice(["proxy-anchor", "supcon", "normsoftmax"]), default="proxy-anchor",
              help="Metric-learning loss of the head.")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: the loss's measured best].")
@click.option("--lr", type=float, default=None, help="Learning rate of the head.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model of that name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def finetune_cmd(app: AppContext, dataset: Path, name: str, base: str | None, split: float, seed: int,
                 pca_dim: int | None, head: bool | None, dim: int | None, loss: str, epochs: int | None,
                 lr: float | None, overwrite: bool, as_json: bool) -> None:
    """Train a projection head (and/or a PCA) on frozen, cached embeddings of DATASET's training split
    and save it as a named model usable by every command (--model NAME)."""
    from ingest.finetune import HeadConfig, finetune

    settings = app.settings()
    config = HeadConfig(loss=loss, dim=dim, seed=seed)
    if epochs is not None:
        config.epochs = epochs
    if lr is not None:
        config.lr = lr
    result = finetune(dataset, name=name, base=base or settings.model, settings=settings, split=split, seed=seed,
                      pca_dim=pca_dim, head=(pca_dim is None) if head is None else head, config=config,
                      overwrite=overwrite, progress=True)
    if as_json:
        echo_json(result)
        return
    b, a = result["before"], result["after"]
    click.echo(f"saved {result['name']} ({result['dim']}-d) at {result['path']}")
    click.echo(f"held-out ({result['held_out']} images the model never saw, index = {result['train']} training "
               f"images):")
    for key, label in (("top1", "top-1"), ("book_precision_at_4", "P@4"), ("map_at_10", "mAP@10")):
        click.echo(f"  {label:<7} before {b[key]:6.2f}  after {a[key]:6.2f}")
    if result.get("verified") is False:
        click.echo("warning: the saved model's vectors differ from the trained head's; its cache was not pre-filled",
                   err=True)


@click.command("tag")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Zero-shot prompts file (CLIP models): one label per line, or 'label: prompt text' "
                   "[default: LOOKALIKE_TAG_PROMPTS].")
@click.option("--restart", is_flag=True, help="Forget the checkpoint of an interrupted run and start over.")
@click.option("--all", "include_labelled", is_flag=True, help="Also tag points that carry user labels.")
@click.option("--batch", type=int, default=256, help="Points per batch (one checkpoint per batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@pass_app
@handle_errors
def tag_cmd(app: AppContext, prompts: Path | None, restart: bool, include_labelled: bool, batch: int,
            as_json: bool) -> None:
    """Re-tag stored points from their labelled neighbours (e.g. after new labels arrived). Resumable:
    an interrupted run continues where it stopped (--restart to start over)."""
    from ingest.tagging import Tagger, checkpoint_path, load_prompts, retag
    from search.store import open_store

    settings = app.settings(**({"tag_prompts": prompts} if prompts else {}))
    store = open_store(settings)
    try:
        meta = store.meta()
        if meta is None:
            raise ConfigError(f"collection '{store.collection}' is empty; run `lookalike backfill` first")
        prompt_list = load_prompts(settings.tag_prompts) if settings.tag_prompts else []
        embedder = None
        if prompt_list:  # the model is only needed to embed the prompts
            from search.models import get_embedder

            embedder = get_embedder(meta.model, settings)
        tagger = Tagger(store, embedder, settings, prompts=prompt_list)  # type: ignore[arg-type]
        if checkpoint_path(settings, store.collection).exists() and not restart:
            _say("resuming an interrupted tagging run (--restart to start over)")
        stats = retag(store, tagger, settings, restart=restart, include_labelled=include_labelled, batch=batch,
                      on_batch=lambda s: _say(f"tagged {s.tagged + s.untagged} points …"))
    finally:
        store.close()
    if as_json:
        echo_json(stats.to_dict())
    else:
        click.echo(f"{stats.seen} points re-tagged ({stats.tagged} tagged, {stats.untagged} left untagged)"
                   + (f"; {stats.skipped} done by the interrupted run" if stats.resumed else ""))


def register(group: click.Group) -> None:
    """Entry point (``lookalike.commands``): add evaluate, finetune and tag to the root group."""
    for command in (evaluate_cmd, finetune_cmd, tag_cmd):
        group.add_command(command)


__all__ = ["evaluate_model", "image_folder_refs", "load_dataset", "register", "tag_figures"]
