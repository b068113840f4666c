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
from search.store import StoreUser

if TYPE_CHECKING:
    from PIL.Image import Image

    from search.models import Embedder
    from search.store import Store


def read_query_image(uri: str, settings: Settings, *, name: str | None = None, data: bytes | None = None) -> Image:
    """A query picture, read and decoded by the same safe code as ingested images (size, pixel and format
    caps; ``ImageError`` names ``name`` or ``uri`` and the reason). ``data``: bytes already in hand (an
    upload). The allowed roots guard what event producers may name; a user's own query file is no event."""
    from search.config import replace
    from search.images import decode_for
    from search.reading import read_bytes

    if data is None:
        data = read_bytes(uri, replace(settings, allowed_roots=()))
    return decode_for(settings, data, name or uri).image


class Searcher(StoreUser):
    """Search one collection. Open once per process; close (or use ``with``) to release the store."""

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 embedder: Embedder | None = None) -> None:
        super().__init__(settings or get_settings(), store)
        self._embedder = embedder
        self._verified = False

    @property
    def embedder(self) -> Embedder:
        # Checked before the model loads: an empty store or a wrong model should not cost a model load.
        _ = self.store  # resolves the alias: it names the collection and its model
        model = self._embedder.name if self._embedder is not None else self.settings.model
        if self.check_model(model) is None:
            raise StoreError(f"collection '{self.store.collection}' does not exist yet; run `lookalike backfill` first")
        if self._embedder is None:
            from search.models import get_embedder

            self._embedder = get_embedder(self.settings.model, self.settings)
        if not self._verified:  # the collection exists: this refuses another preprocessing or dim
            self.store.ensure_collection(self._embedder.meta())
            self._verified = True
        return self._embedder

    def follow_alias(self) -> bool:
        """When the alias names another collection now (``lookalike migrate`` switched it), move this searcher
        to it and its model, between two queries; True when it moved. The old collection's handle is
        closed once the new one is ready, so no query fails during the switch."""
        from search.store import open_store, resolve

        if not self._own_store or self._store is None or self.requested.collection:
            return False
        new = resolve(self.requested)
        if new.collection_name == self._store.collection:  # no alias yet: the model's own collection
            return False
        store = open_store(new)
        try:
            embedder = self._embedder
            if embedder is None or embedder.name != new.model:
                from search.models import get_embedder

                embedder = get_embedder(new.model, new)
            store.ensure_collection(embedder.meta())
        except BaseException:
            store.close()
            raise
        old, self._store, self._embedder, self.settings, self._verified = self._store, store, embedder, new, True
        old.close()
        return True

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
