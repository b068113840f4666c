"""The ANN benchmark of ``evaluate --ann``: exact vs HNSW (and quantized HNSW) search through a real embedded
store on a temporary data dir — recall@10 against exact numpy search, accuracy of the store's own results,
index build time, batch and single-query latency.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ingest.lab.metrics import knn_topk_hits, percent, precision_at_k, recall_at_k
from search.config import Settings, replace


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
            s = replace(settings, data_dir=Path(tmp), qdrant_url=None, collection="evaluate", quantization=quant)
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
                single = _single_query_seconds(store, queries, k, latency_sample)
                labels = index_codes[np.maximum(approx_rows, 0)]
                out.append({
                    "quantization": quant,
                    "recall_at_10_hnsw": round(recall_at_k(approx_rows, exact_ids[:, :k], k), 4),
                    "recall_at_10_store_exact": round(recall_at_k(exact_rows, exact_ids[:, :k], k), 4),
                    "book_precision_at_4": percent(precision_at_k(query_codes, labels, 4).mean()),
                    "top1": percent(knn_topk_hits(query_codes, labels, approx_scores, topk=1,
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


def _single_query_seconds(store: Any, queries: np.ndarray, k: int, sample: int) -> list[float]:
    """Latency of one-query searches on a fixed random sample of the queries."""
    rng = np.random.default_rng(0)
    picks = rng.choice(len(queries), size=min(sample, len(queries)), replace=False)
    single = []
    for q in picks:
        t = time.perf_counter()
        store.search(queries[q], k=k)
        single.append(time.perf_counter() - t)
    return single


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


__all__ = ["store_figures"]
