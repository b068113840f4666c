"""Which family loads a model name, and the per-process cache of loaded embedders.

A *family* (``ModelFamily``) claims names and loads them. Families come from the entry-point group
``lookalike.models`` (each entry point resolves to a ``ModelFamily``, or to a function without arguments
that returns one); the built-in families are declared there too, and are also loaded from
``BUILTIN_FAMILIES`` when the installed metadata predates them. ``get_embedder`` asks the families in
``order`` (then by name); the first that claims a name loads it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from search.config import Settings, get_settings
from search.errors import ModelError
from search.models.base import one_line

if TYPE_CHECKING:
    from search.models.protocol import Embedder

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lookalike.models"

# Entry-point name → value, exactly as pyproject.toml declares them. Built-ins load from here whatever the
# metadata says, and no entry point can replace one: a name that worked keeps its meaning.
BUILTIN_FAMILIES: dict[str, str] = {
    "folders": "search.models.folders:FAMILY",
    "efficientnet": "search.models.efficientnet:FAMILY",
    "concat": "search.models.combine:FAMILY",
    "sentence-transformers": "search.models.sentence_transformer:FAMILY",
}

# Built-in orders. Saved folders come first (a path or a saved name always means that folder), the hub
# last (it takes any name). Third-party families default to 50: after the built-in names, before the hub.
ORDER_FOLDERS, ORDER_BUILTIN, ORDER_COMBINE, ORDER_DEFAULT, ORDER_HUB = 10, 20, 30, 50, 90


@dataclass(frozen=True)
class ModelRow:
    """One line of ``lookalike models``: what a name embeds to, told without loading weights.

    ``dim`` / ``preprocessing`` are None when they cannot be known offline; ``note`` then says why."""

    name: str
    family: str
    dim: int | None
    preprocessing: str | None
    note: str = ""


def _no_rows(settings: Settings) -> list[ModelRow]:
    return []


@dataclass(frozen=True)
class ModelFamily:
    """A set of model names and how to load them.

    ``load(name, settings)`` returns an object satisfying the ``search.models.Embedder`` protocol and
    raises ``ModelError`` (one line) when it cannot. ``describe(settings)`` lists the family's names
    without loading weights. ``matches(name, settings)`` says whether the family takes a name; without it
    the family takes exactly the names ``describe`` lists.
    """

    name: str
    load: Callable[[str, Settings], Embedder]
    describe: Callable[[Settings], Sequence[ModelRow]] = _no_rows
    matches: Callable[[str, Settings], bool] | None = None
    order: int = ORDER_DEFAULT

    def claims(self, name: str, settings: Settings) -> bool:
        if self.matches is not None:
            return bool(self.matches(name, settings))
        return any(row.name == name for row in self.describe(settings))


# -- the families ----------------------------------------------------------------------------------------------

_families: list[ModelFamily] | None = None  # discovered on first use
_registered: list[ModelFamily] = []  # added at run time with register_family
_families_lock = threading.RLock()


def _as_family(obj: Any) -> ModelFamily:
    family = obj if isinstance(obj, ModelFamily) or not callable(obj) else obj()
    if not isinstance(family, ModelFamily):
        raise TypeError(f"expected a ModelFamily, got {type(family).__name__}")
    return family


def _discover() -> list[ModelFamily]:
    found: dict[str, ModelFamily] = {}
    for name, value in BUILTIN_FAMILIES.items():  # a broken built-in is a bug: let it raise
        family = _as_family(EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP).load())
        found[family.name] = family
    builtin_values = set(BUILTIN_FAMILIES.values())
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.value in builtin_values:
            continue
        try:
            family = _as_family(ep.load())
        except Exception as err:  # a broken plugin must not take every model down
            log.warning("cannot load model family %s = %s: %s", ep.name, ep.value, one_line(err))
            continue
        if family.name in found:
            log.warning("model family %r from %s is ignored: the name is taken", family.name, ep.value)
            continue
        found[family.name] = family
    for family in _registered:
        found.setdefault(family.name, family)
    return sorted(found.values(), key=lambda f: (f.order, f.name))


def families() -> list[ModelFamily]:
    """Every family, in the order names are resolved (entry points are read once per process)."""
    global _families
    with _families_lock:
        if _families is None:
            _families = _discover()
        return list(_families)


def register_family(family: ModelFamily) -> None:
    """Add a family at run time (e.g. from a notebook; packages declare an entry point instead)."""
    global _families
    with _families_lock:
        if any(f.name == family.name for f in families()):
            raise ModelError(f"a model family called {family.name!r} is already registered")
        _registered.append(family)
        _families = None


def family_for(name: str, settings: Settings) -> ModelFamily:
    """The first family, in order, that claims ``name``."""
    for family in families():
        if family.claims(name, settings):
            return family
    raise ModelError(f"no model family takes the name {name!r} (see `lookalike models`)")


def describe_models(settings: Settings | None = None) -> list[ModelRow]:
    """The rows of every family, in resolution order; loads no weights."""
    settings = settings or get_settings()
    rows: list[ModelRow] = []
    for family in families():
        try:
            rows.extend(family.describe(settings))
        except Exception as err:  # one family's trouble must not hide the others
            rows.append(ModelRow(f"({family.name})", family.name, None, None, f"cannot list: {one_line(err)}"))
    return rows


# -- loading, once per process ------------------------------------------------------------------------------------


def _load(name: str, settings: Settings) -> Embedder:
    return family_for(name, settings).load(name, settings)


_embedders: dict[tuple[str, str, str], Embedder] = {}
_key_locks: dict[tuple[str, str, str], threading.Lock] = {}
_registry_lock = threading.Lock()
_loading = threading.local()  # keys this thread is loading now (a head loads its base inside its own load)


def _loading_keys() -> set[tuple[str, str, str]]:
    keys: set[tuple[str, str, str]] | None = getattr(_loading, "keys", None)
    if keys is None:
        keys = _loading.keys = set()
    return keys


def get_embedder(name: str | None = None, settings: Settings | None = None) -> Embedder:
    """The embedder called ``name`` (default ``settings.model``), loaded once per process per
    (name, backend, data dir); concurrent first calls wait for one load."""
    settings = settings or get_settings()
    name = (name or settings.model).strip()
    if not name:
        raise ModelError("no model given: pass --model NAME or set LOOKALIKE_MODEL")
    key = (name, settings.backend, str(settings.data_dir))
    with _registry_lock:
        if key in _embedders:
            return _embedders[key]
        lock = _key_locks.setdefault(key, threading.Lock())
    loading = _loading_keys()
    if key in loading:  # e.g. a saved head whose base is itself: the lock below would wait forever
        raise ModelError(f"model {name!r} depends on itself (a saved head names it as its own base); "
                         "save it again with finetune on another base")
    with lock:  # one load per key; other keys (e.g. the parts of a+b) load independently
        if key not in _embedders:
            single_threaded_blas()
            loading.add(key)
            try:
                embedder = _load(name, settings)
            finally:
                loading.discard(key)
            with _registry_lock:
                _embedders[key] = embedder
        return _embedders[key]


@functools.cache
def single_threaded_blas() -> None:
    """Limit numpy's BLAS (OpenBLAS) to one thread in a process that runs a model. Its small products (a
    batch's 32×32 similarity matrix) gain nothing from threads, and its threads busy-wait for work: beside
    the model's inference threads on a 2-core machine one such product took 15.8 ms instead of 0.05 ms,
    and the spinning took CPU from inference (benchmarks/results/backfill.md)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, numpy keeps its default
        return
    threadpool_limits(limits=1, user_api="blas")


def clear_embedders() -> None:
    """Forget loaded embedders (tests; or after saving a model under a name already loaded)."""
    with _registry_lock:
        _embedders.clear()
        _key_locks.clear()
