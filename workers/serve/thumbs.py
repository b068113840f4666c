"""Thumbnails of stored points: the first readable file among the point's ``uris``, cached by content.

A client names a point id, never a path: the paths come from the index. Each is read through
``search.reading`` (so ``LOOKALIKE_ALLOWED_ROOTS`` holds when set, with its size caps and symlink rules) and
decoded by ``search.images``; a file whose bytes no longer hash to the point's ``sha256`` (edited or
replaced since it was indexed) is skipped, so a thumbnail always shows what was embedded. URLs are never
fetched for thumbnails. Because the id is the content hash, a thumbnail never changes: it is cached in
memory (LRU) and the response may be cached by browsers for a long time.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any

from search.config import Settings
from search.errors import ImageError
from search.images import decode_for
from search.reading import local_path, read_bytes
from search.schema import sha256_hex

MIN_SIZE, MAX_SIZE = 16, 1024


class Thumbnails:
    def __init__(self, settings: Settings, capacity: int = 1024) -> None:
        self.settings, self.capacity = settings, capacity
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, payload: dict[str, Any], size: int) -> bytes | None:
        """JPEG bytes at most ``size`` px on the long side, or None when no stored file is readable."""
        sha = str(payload.get("sha256") or "")
        key = (sha, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._render(payload, sha, size)
        if data is not None and self.capacity:
            with self._lock:
                self._cache[key] = data
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return data

    def _render(self, payload: dict[str, Any], sha: str, size: int) -> bytes | None:
        for uri in payload.get("uris") or []:
            if not isinstance(uri, str) or local_path(uri) is None:
                continue
            try:
                raw = read_bytes(uri, self.settings)
                if sha and sha256_hex(raw) != sha:
                    continue  # the file changed since it was indexed
                image = decode_for(self.settings, raw, uri, draft=(size, size)).image
            except ImageError:
                continue
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85, optimize=True)
            return out.getvalue()
        return None


__all__ = ["MAX_SIZE", "MIN_SIZE", "Thumbnails"]
