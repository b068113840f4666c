"""One translation of the backend-neutral ``search.schema.Filter`` into a Qdrant filter, for both backends.

Each backend passes its own constructors (``Spelling``); the walk itself — which conditions go into ``must``
and ``must_not``, how a ``Match`` becomes match conditions, which values are allowed — lives only here, so a
filter feature is added once and both backends get it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search.errors import StoreError
from search.schema import Filter, Match
from search.store.base import _point_id


@dataclass(frozen=True)
class Spelling:
    """How one backend builds each piece of a Qdrant filter."""

    match_value: Callable[[str, Any], Any]  # (field, value) -> condition: the field has this value
    match_any: Callable[[str, list[Any]], Any]  # (field, values) -> condition: the field has any of them
    is_empty: Callable[[str], Any]  # field -> condition: missing, null or []
    has_id: Callable[[list[str]], Any]  # point ids -> condition
    filter: Callable[..., Any]  # (must=, should=, must_not=) lists or None -> filter (also a condition)


def translate(flt: Filter | None, spell: Spelling) -> Any:
    """The backend's filter for ``flt``; None when it has no condition (so the engine skips filtering)."""
    if flt is None:
        return None
    must = [_match(m, spell) for m in flt.must]
    must_not = [_match(m, spell) for m in flt.must_not]
    must_not += [spell.is_empty(key) for key in flt.non_empty]
    if flt.exclude_ids:
        must_not.append(spell.has_id(sorted({_point_id(i) for i in flt.exclude_ids})))
    if not must and not must_not:
        return None
    return spell.filter(must=must or None, should=None, must_not=must_not or None)


def _match(m: Match, spell: Spelling) -> Any:
    """``m.field`` has any of ``m.values``. Qdrant's MatchAny takes only strings or only integers, so a
    mixed match becomes one condition per type, any of which may hold."""
    by_type: dict[type, list[Any]] = {}
    for value in m.values:
        if isinstance(value, str):
            by_type.setdefault(str, []).append(str(value))
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            by_type.setdefault(int, []).append(int(value))  # numpy integers too: the client takes only int
        else:  # bool too, although Qdrant matches bools: qdrant-edge-py 0.9.0 turns MatchValue(True) into 1,
            # so the embedded store would silently match other points than a server does
            raise StoreError(f"filter on {m.field!r}: cannot match {value!r}; match values are strings or "
                             f"whole numbers")
    conditions = [spell.match_value(m.field, vs[0]) if len(vs) == 1 else spell.match_any(m.field, vs)
                  for vs in by_type.values()]
    if not conditions:  # no values: matches no point, as an empty MatchAny does on both engines
        return spell.match_any(m.field, [])
    if len(conditions) == 1:
        return conditions[0]
    return spell.filter(must=None, should=conditions, must_not=None)
