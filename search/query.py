"""Queries over the index: image → images, text → images (CLIP), id → images, with filters and a
score threshold. The Python API behind ``lookalike search``::

    from search.query import Searcher
    with Searcher() as s:                                  # settings from LOOKALIKE_* env
        hits = s.by_images([PIL.Image.open("cat.jpg")], k=5)[0]
        hits = s.by_texts(["a red car"], k=5)[0]           # CLIP models only
        hits = s.by_ids([point_id], k=5, filter=Filter.parse(["label=cat"]))[0]

Every method takes a batch and returns one list of ``Hit`` per query, best first. The model is loaded
once, on first use, and only when a query needs it (``by_ids`` never does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings, get_settings
from search.errors import LookalikeError, StoreError
from search.schema import Filter, Hit

if TYPE_CHECKING:
    from PIL.Image import Image

    from search.models import Embedder
    from search.store import Store


class Searcher:
    """Search one collection. Open once per process; close (or use ``with``) to release the store."""

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 embedder: Embedder | None = None) -> None:
        self.settings = settings or get_settings()
        self._store = store
        self._own_store = store is None
        self._embedder = embedder

    @property
    def store(self) -> Store:
        if self._store is None:
            from search.store import open_store

            self._store = open_store(self.settings)
        return self._store

    @property
    def embedder(self) -> Embedder:
        meta = self.store.meta()  # before the model: an empty store should not cost a model load to report
        if meta is None:
            raise StoreError(f"collection '{self.store.collection}' does not exist yet; run `lookalike backfill` first")
        if self._embedder is None:
            from search.models import get_embedder

            self._embedder = get_embedder(self.settings.model, self.settings)
        problem = meta.mismatch(self._embedder.meta())
        if problem:
            raise StoreError(f"collection '{self.store.collection}' cannot be searched with model "
                             f"{self._embedder.name!r}: {problem}; pass --model {meta.model}")
        return self._embedder

    def by_vectors(self, vectors: np.ndarray, *, k: int = 10, filter: Filter | None = None,
                   min_score: float | None = None) -> list[list[Hit]]:
        if len(vectors) == 0:
            return []
        return self.store.search(np.asarray(vectors, dtype=np.float32), k=k, filter=filter, min_score=min_score)

    def by_images(self, images: Sequence[Image], **kw: Any) -> list[list[Hit]]:
        return self.by_vectors(self.embedder.embed_images(list(images)), **kw)

    def by_texts(self, texts: Sequence[str], **kw: Any) -> list[list[Hit]]:
        return self.by_vectors(self.embedder.embed_texts(list(texts)), **kw)

    def by_ids(self, ids: Sequence[str], *, k: int = 10, filter: Filter | None = None,
               min_score: float | None = None) -> list[list[Hit]]:
        """Neighbours of stored points (the point itself is excluded)."""
        found = {p.id: p for p in self.store.retrieve(list(ids), with_vectors=True)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise LookalikeError(f"no point with id {missing[0]} in collection '{self.store.collection}'")
        results = []
        for pid in ids:  # one query each: every query excludes a different id
            f = filter or Filter()
            f = Filter(must=f.must, must_not=f.must_not, non_empty=f.non_empty, exclude_ids=(*f.exclude_ids, pid))
            results.extend(self.by_vectors(np.asarray([found[pid].vector]), k=k, filter=f, min_score=min_score))
        return results

    def close(self) -> None:
        if self._store is not None and self._own_store:
            self._store.close()
            self._store = None

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
