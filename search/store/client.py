"""The client backend: ``qdrant_client.QdrantClient`` — a Qdrant server (``LOOKALIKE_QDRANT_URL``) for several
processes, or any client a caller builds (tests use local mode ``:memory:``). The collection metadata goes into
the collection's own ``metadata``. Unreachable servers raise ``StoreUnavailable`` (transient: retry).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import search.store.base as base
from search.config import Settings
from search.errors import CollectionMismatch, ConfigError, StoreError, StoreUnavailable
from search.schema import PAYLOAD_INDEXES, CollectionMeta, Filter, Hit, PointRecord
from search.store.aliases import ServerAliases
from search.store.base import (
    SearchRequest,
    Store,
    _hit,
    _mismatch_message,
    _payload,
    _point_id,
    _quantization_kind,
    _record,
    _split,
    _vector_list,
)
from search.store.filters import Spelling, translate


@functools.cache
def _spelling() -> Spelling:
    from qdrant_client import models

    return Spelling(
        match_value=lambda key, value: models.FieldCondition(key=key, match=models.MatchValue(value=value)),
        match_any=lambda key, values: models.FieldCondition(key=key, match=models.MatchAny(any=values)),
        is_empty=lambda key: models.IsEmptyCondition(is_empty=models.PayloadField(key=key)),
        has_id=lambda ids: models.HasIdCondition(has_id=ids),
        filter=models.Filter,
    )


def _redact(url: str) -> str:
    """The URL without credentials or query, safe for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<invalid url>"


class ClientStore(Store):
    """A store over ``qdrant_client.QdrantClient``: a server, or local mode in tests.

    ``ClientStore(QdrantClient(location=":memory:"), "name")`` or ``ClientStore.from_settings(settings)``.
    """

    embedded = False

    def __init__(self, client: Any, collection: str, *, settings: Settings | None = None,
                 url: str | None = None, owns_client: bool = False) -> None:
        self.client = client
        self.collection = collection
        self.settings = settings
        self.where = _redact(url) if url else "the Qdrant client"
        self._owns_client = owns_client
        self._meta: CollectionMeta | None = None
        self._closed = False
        # local mode (tests) warns that payload indexes and search params do nothing there: skip them
        self._local = type(getattr(client, "_client", None)).__name__ == "QdrantLocal"

    @classmethod
    def from_settings(cls, settings: Settings, collection: str | None = None) -> ClientStore:
        from qdrant_client import QdrantClient

        if not settings.qdrant_url:
            raise ConfigError("LOOKALIKE_QDRANT_URL is not set")
        url = settings.qdrant_url
        try:
            client = QdrantClient(url=url, api_key=settings.qdrant_api_key, timeout=base.CLIENT_TIMEOUT_S,
                                  check_compatibility=False)
        except Exception as err:
            raise ConfigError(f"LOOKALIKE_QDRANT_URL={_redact(url)!r} is not usable: {type(err).__name__}") from None
        return cls(client, collection or settings.collection_name, settings=settings, url=url, owns_client=True)

    def __repr__(self) -> str:
        return f"ClientStore({self.where!r}, {self.collection!r})"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate client/transport exceptions; the API key is never part of what we print."""
        if self._closed:
            raise StoreError(f"the store for '{self.collection}' is closed; open it again with open_store")
        try:
            yield
        except StoreError:
            raise
        except Exception as err:
            raise self._translate(err, what) from None

    def _translate(self, err: Exception, what: str) -> StoreError:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        where, name = self.where, self.collection
        unreachable = f"Qdrant at {where} is unreachable ({what}: {{}}); is the server running? (LOOKALIKE_QDRANT_URL)"
        if isinstance(err, ResponseHandlingException):
            source = getattr(err, "source", None) or err
            return StoreUnavailable(unreachable.format(f"{type(source).__name__}: {source}"))
        if isinstance(err, UnexpectedResponse):
            status = err.status_code
            if status in (401, 403):
                return StoreError(f"Qdrant at {where} refused the request ({status}); check LOOKALIKE_QDRANT_API_KEY")
            if status == 404:
                return StoreError(f"collection '{name}' does not exist at {where}; ingest images first or choose "
                                  f"another with --collection/LOOKALIKE_COLLECTION")
            text = (err.content or b"")[:200].decode("utf-8", "replace")
            if status in (429, 502, 503, 504) or status >= 500:
                return StoreUnavailable(f"Qdrant at {where} answered {status} to {what}: {text}")
            return StoreError(f"Qdrant at {where} rejected {what} ({status}): {text}")
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__.startswith(("httpx", "httpcore")):
            return StoreUnavailable(unreachable.format(f"{type(err).__name__}: {err}"))
        try:
            import grpc
        except ImportError:  # pragma: no cover - grpc ships with qdrant-client
            grpc = None
        if grpc is not None and isinstance(err, grpc.RpcError):
            code = err.code() if hasattr(err, "code") else None
            transient = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED}
            if code in transient:
                return StoreUnavailable(unreachable.format(code))
            if code == grpc.StatusCode.NOT_FOUND:
                return StoreError(f"collection '{name}' does not exist at {where}; ingest images first")
            return StoreError(f"Qdrant at {where} rejected {what}: {code}")
        if isinstance(err, ValueError) and "not found" in str(err):  # local mode
            return StoreError(f"collection '{name}' does not exist; ingest images first or choose another "
                              f"with --collection/LOOKALIKE_COLLECTION")
        return StoreError(f"{what} on '{name}' failed: {type(err).__name__}: {err}")

    @staticmethod
    def _filter(flt: Filter | None) -> Any:
        return None if flt is None else translate(flt, _spelling())

    def meta(self) -> CollectionMeta | None:
        with self._errors("reading the collection"):
            if not self.client.collection_exists(self.collection):
                return None
            info = self.client.get_collection(self.collection)
        self._meta = CollectionMeta.from_dict(getattr(info.config, "metadata", None))
        return self._meta

    def ensure_collection(self, meta: CollectionMeta) -> CollectionMeta:
        from qdrant_client import models

        have = self.meta()
        with self._errors("creating the collection"):
            if have is None and not self.client.collection_exists(self.collection):
                quant = {
                    "int8": lambda: models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=0.99, always_ram=True)),
                    "binary": lambda: models.BinaryQuantization(
                        binary=models.BinaryQuantizationConfig(always_ram=True)),
                }.get(_quantization_kind(self.settings))
                try:
                    self.client.create_collection(
                        self.collection,
                        vectors_config=models.VectorParams(size=meta.dim, distance=models.Distance(meta.distance)),
                        hnsw_config=models.HnswConfigDiff(m=base.HNSW_M, ef_construct=base.HNSW_EF_CONSTRUCT,
                                                          full_scan_threshold=base.FULL_SCAN_THRESHOLD_KB),
                        quantization_config=quant() if quant else None,
                        metadata=meta.to_dict(),
                    )
                    have = meta
                except Exception as err:  # lost a creation race with another worker: read theirs
                    if not self.client.collection_exists(self.collection):
                        raise err from None
                    have = self.meta()
            elif have is None:
                if self.client.count(self.collection, exact=True).count > 0:
                    raise CollectionMismatch(
                        f"collection '{self.collection}' at {self.where} holds points but no lookalike metadata; "
                        f"use --collection/LOOKALIKE_COLLECTION for a separate collection")
                self.client.update_collection(self.collection, metadata=meta.to_dict())
                have = meta
            if have is None:
                raise StoreError(f"collection '{self.collection}' at {self.where} has no lookalike metadata")
            if have.mismatch(meta):
                raise CollectionMismatch(_mismatch_message(self.collection, have, meta))
            self._ensure_indexes()
        self._meta = have
        return have

    def _ensure_indexes(self) -> None:
        from qdrant_client import models

        if self._local:
            return
        present = set(self.client.get_collection(self.collection).payload_schema or {})
        for field_name, kind in PAYLOAD_INDEXES.items():
            if field_name not in present:
                self.client.create_payload_index(self.collection, field_name,
                                                 field_schema=models.PayloadSchemaType(kind), wait=True)

    def _dim(self) -> int:
        meta = self._meta or self.meta()
        if meta is None:
            raise StoreError(f"collection '{self.collection}' does not exist at {self.where}; ingest images first "
                             f"or choose another with --collection/LOOKALIKE_COLLECTION")
        return meta.dim

    def upsert(self, points: Sequence[PointRecord]) -> None:
        from qdrant_client import models

        if not points:
            return
        dim = self._dim()
        structs = []
        for p in points:
            pid = _point_id(p.id)
            structs.append(models.PointStruct(id=pid, vector=_vector_list(p.vector, dim, pid),
                                              payload=dict(p.payload or {})))
        with self._errors("upsert"):
            self.client.upsert(self.collection, points=structs, wait=True)

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[PointRecord]:
        if not ids:
            return []
        with self._errors("retrieve"):
            records = self.client.retrieve(self.collection, [_point_id(i) for i in ids], with_payload=True,
                                           with_vectors=bool(with_vectors))
        return [_record(r, with_vectors) for r in records]

    def set_payload(self, id: str, payload: dict) -> None:
        pid = _point_id(id)
        with self._errors("set_payload"):
            if not self.client.retrieve(self.collection, [pid], with_payload=False, with_vectors=False):
                raise StoreError(f"no point {pid} in collection '{self.collection}'")
            self.client.set_payload(self.collection, payload=dict(payload), points=[pid], wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids:
            return
        with self._errors("delete"):
            self.client.delete(self.collection, points_selector=models.PointIdsList(
                points=[_point_id(i) for i in ids]), wait=True)

    def count(self, filter: Filter | None = None) -> int:
        with self._errors("count"):
            return int(self.client.count(self.collection, count_filter=self._filter(filter), exact=True).count)

    def scroll(self, filter: Filter | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[PointRecord]:
        flt = self._filter(filter)
        offset: Any = None
        while True:
            with self._errors("scroll"):
                records, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=batch, offset=offset,
                                                     with_payload=True, with_vectors=bool(with_vectors))
            for r in records:
                yield _record(r, with_vectors)
            if offset is None or not records:
                return

    def search_many(self, requests: Sequence[SearchRequest]) -> list[list[list[Hit]]]:
        from qdrant_client import models

        quant = _quantization_kind(self.settings)
        batch, sizes = [], []
        for req in requests:
            queries = self._query_matrix(req.vectors, self._dim(), req.k)
            params = None if self._local else models.SearchParams(
                hnsw_ef=max(base.HNSW_EF, req.k), exact=req.exact,
                quantization=None if quant == "none" else models.QuantizationSearchParams(
                    rescore=True, oversampling=base.OVERSAMPLING[quant]))
            flt = self._filter(req.filter)
            batch += [models.QueryRequest(query=q.tolist(), limit=req.k, filter=flt, score_threshold=req.min_score,
                                          with_payload=_payload(req.payload), params=params)
                          for q in queries]
            sizes.append(len(queries))
        if not batch:
            return [[] for _ in requests]
        with self._errors("search"):
            responses = self.client.query_batch_points(self.collection, requests=batch)
        return _split([[_hit(p) for p in r.points] for r in responses], sizes)

    def aliases(self) -> ServerAliases:
        return ServerAliases(self.client)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with contextlib.suppress(Exception):
                self.client.close()
