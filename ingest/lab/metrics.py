"""Retrieval metrics as pure functions (numpy only): nothing here reads images, models or stores.

Conventions: embeddings are float32 rows, L2-normalised, so a dot product is the cosine similarity.
Labels are integer class codes (``encode_labels`` turns names into codes). Neighbour lists are
``(n_queries, k)`` arrays of index rows, nearest first, with their similarities alongside.

* ``precision_at_k`` — per query, the share of its k nearest neighbours that share its class. With
  k = 4 and the query excluded from its own results this is the "book protocol" (Practical Deep
  Learning for Cloud, Mobile & Edge, ch. 4); its mean over queries is the book's figure.
* ``class_mean`` — the same averaged per class first, so large classes do not dominate.
* ``knn_topk_accuracy`` — a kNN classifier: the k nearest neighbours vote for their class, weighted by
  similarity (``softmax(sim / temperature)``); top-1 / top-5 = the true class is among the best-voted 1 / 5.
* ``average_precision_at_k`` — AP@k with the usual ``min(R, k)`` denominator (R = relevant items in the index).
* ``retrieve`` — all of the above for one index and its queries at once (``Retrieval``: neighbours + per-query
  figures), as ``evaluate`` and ``finetune`` report them; ``confusions`` — each class's most frequent wrong
  neighbour class.
* ``pca_fit`` / ``pca_apply`` — the PCA used by the evaluation sweep and by ``finetune --pca``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VOTE_K = 10  # neighbours that vote in the kNN classifier
VOTE_TEMPERATURE = 0.05  # softmax temperature over cosine similarities (chosen on Caltech101-dev, see results)
VOTE_RULE = f"similarity-weighted vote of the {VOTE_K} nearest (softmax over cosine, T={VOTE_TEMPERATURE})"


def percent(x: float) -> float:
    """A share (0..1) as a percentage rounded to 2 decimals, the unit of every reported figure."""
    return round(100.0 * float(x), 2)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def encode_labels(labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Class names → (integer codes, sorted class names)."""
    classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[c] for c in labels], dtype=np.int64), classes


def nearest(index: np.ndarray, queries: np.ndarray, k: int, *, exclude_self: bool = False,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``index`` for each query by inner product: (ids, similarities), nearest first.

    ``exclude_self``: the queries ARE the index (same rows, same order); row i never returns i.
    """
    index = np.asarray(index, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if exclude_self and len(index) != len(queries):
        raise ValueError("exclude_self needs queries == index")
    k = min(k, len(index) - (1 if exclude_self else 0))
    n = len(queries)
    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        block = queries[start:start + chunk] @ index.T
        if exclude_self:
            rows = np.arange(len(block))
            block[rows, start + rows] = -np.inf
        part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        part_sims = np.take_along_axis(block, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        ids[start:start + chunk] = np.take_along_axis(part, order, axis=1)
        sims[start:start + chunk] = np.take_along_axis(part_sims, order, axis=1)
    return ids, sims


def precision_at_k(query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int = 4) -> np.ndarray:
    """Per query: share of its first k neighbours with the query's class (0..1)."""
    hits = np.asarray(neighbour_labels)[:, :k] == np.asarray(query_labels)[:, None]
    return hits.mean(axis=1)


def per_class(values: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Mean of ``values`` for each class code."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    return {int(c): float(values[labels == c].mean()) for c in np.unique(labels)}


def class_mean(values: np.ndarray, labels: np.ndarray) -> float:
    """Class-balanced mean: the mean over classes of the per-class means."""
    return float(np.mean(list(per_class(values, labels).values())))


def vote_scores(neighbour_labels: np.ndarray, neighbour_sims: np.ndarray, n_classes: int, *, k: int = VOTE_K,
                temperature: float | None = VOTE_TEMPERATURE) -> np.ndarray:
    """(n, n_classes) vote shares of the k nearest neighbours; each row sums to 1.

    Each neighbour weighs ``exp((sim - best_sim) / temperature)``; ``temperature=None`` is a plain majority vote.
    """
    labels = np.asarray(neighbour_labels)[:, :k]
    sims = np.asarray(neighbour_sims, dtype=np.float64)[:, :k]
    weights = np.ones_like(sims) if temperature is None else np.exp((sims - sims[:, :1]) / temperature)
    scores = np.zeros((len(labels), n_classes), dtype=np.float64)
    np.add.at(scores, (np.repeat(np.arange(len(labels)), labels.shape[1]), labels.ravel()), weights.ravel())
    return scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-300)


def knn_topk_hits(query_labels: np.ndarray, neighbour_labels: np.ndarray, neighbour_sims: np.ndarray, *,
                  topk: int, n_classes: int | None = None, k: int = VOTE_K,
                  temperature: float | None = VOTE_TEMPERATURE) -> np.ndarray:
    """Per query: 1.0 if its class is among the ``topk`` best-voted classes of its k neighbours.

    Ties are broken towards the class of the nearer neighbour (the vote of rank 1 gets a tiny bonus).
    """
    query_labels = np.asarray(query_labels)
    neighbour_labels = np.asarray(neighbour_labels)
    if n_classes is None:
        n_classes = int(max(query_labels.max(initial=0), neighbour_labels.max(initial=0))) + 1
    scores = vote_scores(neighbour_labels, neighbour_sims, n_classes, k=k, temperature=temperature)
    rows = np.arange(len(scores))
    scores[rows, neighbour_labels[:, 0]] += 1e-9
    true = scores[rows, query_labels]
    # rank of the true class = how many classes scored strictly higher
    rank = (scores > true[:, None]).sum(axis=1)
    return (rank < topk).astype(np.float64)


def average_precision_at_k(query_labels: np.ndarray, neighbour_labels: np.ndarray, n_relevant: np.ndarray,
                           k: int = 10) -> np.ndarray:
    """Per query AP@k = sum over ranks i ≤ k of precision@i · rel_i, divided by min(R, k).

    ``n_relevant``: per query, how many items of its class the index holds (excluding the query itself).
    Queries with R = 0 score 0.
    """
    rel = (np.asarray(neighbour_labels)[:, :k] == np.asarray(query_labels)[:, None]).astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    denom = np.minimum(np.asarray(n_relevant, dtype=np.float64), k)
    return np.where(denom > 0, (precision * rel).sum(axis=1) / np.maximum(denom, 1), 0.0)


def relevant_counts(query_labels: np.ndarray, index_labels: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
    """Per query: how many index rows share its class (minus one for the query itself when it is in the index)."""
    counts = np.bincount(np.asarray(index_labels), minlength=int(np.max(query_labels, initial=0)) + 1)
    return counts[np.asarray(query_labels)] - (1 if exclude_self else 0)


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
    """Exact neighbours of ``queries`` in ``index`` and their precision@4, top-1/top-5 kNN hits and AP@10."""
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


def recall_at_k(approx: Sequence[Sequence[object]], exact: Sequence[Sequence[object]], k: int = 10) -> float:
    """Mean share of the exact top-k ids that the approximate top-k also returned."""
    shares = [len(set(list(a)[:k]) & set(list(e)[:k])) / max(len(list(e)[:k]), 1)
              for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(shares)) if shares else 0.0


def pca_fit(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the rows of ``x``: (mean (d,), components (dim, d)), components orthonormal, largest variance first."""
    x = np.asarray(x, dtype=np.float64)
    if not 0 < dim <= min(x.shape):
        raise ValueError(f"PCA dimension {dim} must be between 1 and {min(x.shape)} (rows, features)")
    mean = x.mean(axis=0)
    centred = x - mean
    if len(x) > x.shape[1]:
        # many rows: the eigenvectors of the d×d scatter matrix are the components, and far cheaper than an SVD
        values, vectors = np.linalg.eigh(centred.T @ centred)
        vt = vectors[:, np.argsort(values)[::-1]].T
    else:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:dim]
    # fix each component's sign (largest coefficient positive) so fits are reproducible
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(signs == 0, 1, signs)[:, None]
    return mean.astype(np.float32), vt.astype(np.float32)


def pca_apply(x: np.ndarray, mean: np.ndarray, components: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Project rows onto the components: ``(x - mean) @ components.T`` (= x @ W.T + b with W = components,
    b = −mean·componentsᵀ, the form saved as a Dense layer), then L2-normalise."""
    out = (np.asarray(x, dtype=np.float32) - mean) @ components.T
    return l2_normalize(out) if normalize else out


__all__ = [
    "VOTE_K",
    "VOTE_RULE",
    "VOTE_TEMPERATURE",
    "Retrieval",
    "average_precision_at_k",
    "class_mean",
    "confusions",
    "encode_labels",
    "knn_topk_hits",
    "l2_normalize",
    "nearest",
    "pca_apply",
    "pca_fit",
    "per_class",
    "percent",
    "precision_at_k",
    "recall_at_k",
    "relevant_counts",
    "retrieve",
    "vote_scores",
]
