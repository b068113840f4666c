"""Auto-tagging: predicted labels for an image from its nearest *labelled* neighbours, or from CLIP prompts.

The rule (``vote``), chosen by measurement on a held-out Caltech101 split (benchmarks/results/evaluate.md):
the k nearest labelled neighbours vote for each of their labels with weight ``exp((sim - best_sim) / T)``;
a label's confidence is its share of the total weight. Labels at or above ``settings.tag_threshold`` become
tags ``{"label", "score", "method": "knn", "neighbours": [ids that voted for it]}``; when no label reaches
the threshold the image stays untagged — a missing tag is cheaper than a wrong one.

With a CLIP model and prompts (``label`` or ``label: prompt text`` per line), images with *no* labelled
neighbour at all (a fresh collection) are tagged zero-shot: the softmax over labels of
``100 · cos(image, prompt)`` (CLIP's logit scale), same threshold, ``{"method": "zero-shot", "prompt"}``.

``retag`` re-tags points already stored (after new labels arrive), resumably: the ids done so far are
appended to a checkpoint file under the data dir, removed when the run completes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import ConfigError, ModelError
from search.schema import Filter, Hit
from search.store.base import SearchRequest

if TYPE_CHECKING:
    from search.models import Embedder
    from search.store import Store

log = logging.getLogger(__name__)

TAG_TEMPERATURE = 0.05  # softmax temperature over cosine similarities; see the module docstring
CLIP_LOGIT_SCALE = 100.0
DEFAULT_TEMPLATE = "a photo of a {label}"
LABELLED = Filter(non_empty=("labels",))


# -- the pure rule ------------------------------------------------------------------------------------
def vote(neighbour_labels: Sequence[Sequence[str]], scores: Sequence[float], *, threshold: float,
         temperature: float | None = TAG_TEMPERATURE) -> list[tuple[str, float, list[int]]]:
    """Tags from neighbours: ``[(label, confidence, [indices of the neighbours that voted for it])]``,
    most confident first, only labels whose confidence ≥ ``threshold``; ``[]`` when none does.

    ``neighbour_labels[i]`` are the labels of neighbour i (nearest first) and ``scores[i]`` its cosine
    similarity. ``temperature=None`` gives every neighbour the same weight (plain majority).
    """
    if len(neighbour_labels) != len(scores):
        raise ValueError("neighbour_labels and scores differ in length")
    if not len(scores):
        return []
    best = max(scores)
    weights = [1.0 if temperature is None else math.exp((s - best) / temperature) for s in scores]
    total = sum(weights)
    share: dict[str, float] = {}
    voters: dict[str, list[int]] = {}
    for i, (labels, w) in enumerate(zip(neighbour_labels, weights, strict=True)):
        for label in dict.fromkeys(labels):
            share[label] = share.get(label, 0.0) + w
            voters.setdefault(label, []).append(i)
    out = [(label, s / total, voters[label]) for label, s in share.items() if s / total >= threshold]
    return sorted(out, key=lambda t: (-t[1], t[0]))


# -- prompts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    label: str
    text: str


def parse_prompts(lines: Iterable[str]) -> list[Prompt]:
    """``label`` or ``label: prompt text`` per line; blank lines and ``#`` comments are skipped.
    A bare label gets the prompt ``"a photo of a <label>"``. Several lines may share a label."""
    prompts: list[Prompt] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, text = line.partition(":")
        label, text = label.strip(), text.strip()
        if not label:
            raise ConfigError(f"prompt line {raw.strip()!r} has no label; write 'label' or 'label: prompt text'")
        prompts.append(Prompt(label, text if sep and text else DEFAULT_TEMPLATE.format(label=label)))
    return prompts


def load_prompts(path: Path) -> list[Prompt]:
    try:
        return parse_prompts(Path(path).read_text(encoding="utf-8").splitlines())
    except OSError as err:
        raise ConfigError(f"cannot read prompts file {path}: {err.strerror or err}; fix LOOKALIKE_TAG_PROMPTS "
                          "or --prompts") from None


# -- the tagger the pipeline calls ----------------------------------------------------------------------
class Tagger:
    """Tags vectors against the store's labelled points (and CLIP prompts when there are none)."""

    def __init__(self, store: Store, embedder: Embedder, settings: Settings,
                 prompts: Sequence[str] | Sequence[Prompt] | None = None, *,
                 temperature: float | None = TAG_TEMPERATURE) -> None:
        self.store = store
        self.embedder = embedder
        self.k = max(1, settings.tag_k)
        self.threshold = settings.tag_threshold
        self.temperature = temperature
        if prompts is None and settings.tag_prompts is not None:
            self.prompts = load_prompts(settings.tag_prompts)
        else:
            self.prompts = [p if isinstance(p, Prompt) else q for p in (prompts or [])
                            for q in ([p] if isinstance(p, Prompt) else parse_prompts([p]))]
        self._text: tuple[np.ndarray, list[Prompt], list[str]] | None = None
        if self.prompts and not embedder.supports_text:
            log.warning("model %s cannot embed text: zero-shot prompts are ignored (use a CLIP model)",
                        embedder.name)
            self.prompts = []
        if len({p.label for p in self.prompts}) == 1:
            log.warning("zero-shot tagging needs at least two labels to compare; the prompts are ignored")
            self.prompts = []

    def tag(self, vectors: np.ndarray, exclude_ids: Sequence[str | None] = ()) -> list[list[dict[str, Any]]]:
        """Per vector: ``[]`` or its tags (see the module docstring). ``exclude_ids[i]`` is vector i's own
        point id when it is (or may already be) stored, so an image never votes for itself."""
        return self._tag(vectors, exclude_ids, nearest=False)[0]

    def tag_with_nearest(self, vectors: np.ndarray, exclude_ids: Sequence[str | None] = ()) -> tuple[
            list[list[dict[str, Any]]], list[Hit | None]]:
        """``tag``, and each vector's nearest stored point of any kind (labelled or not; None when there is
        none), from the same store call: the batched search carries a second, unfiltered request for one
        neighbour. The tags are exactly ``tag``'s. The pipeline flags near-duplicates with it."""
        return self._tag(vectors, exclude_ids, nearest=True)

    def _tag(self, vectors: np.ndarray, exclude_ids: Sequence[str | None], *, nearest: bool) -> tuple[
            list[list[dict[str, Any]]], list[Hit | None]]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if not len(vectors):
            return [], []
        own = list(exclude_ids) + [None] * (len(vectors) - len(exclude_ids))
        # One batched search for all vectors; asking one more and dropping the own id afterwards returns
        # the same neighbours as a per-vector exclude_ids filter, at the cost of one query instead of n.
        extra = 1 if any(own) else 0
        requests = [SearchRequest(vectors, self.k + extra, LABELLED, payload=("labels",))]
        if nearest:  # the nearest point's id and score are all duplicate flagging needs
            requests.append(SearchRequest(vectors, 1 + extra, payload=False))
        results = self.store.search_many(requests)
        out: list[list[dict[str, Any]]] = []
        zero_shot_rows: list[int] = []
        for row, hits in enumerate(results[0]):
            hits = [h for h in hits if h.id != own[row]][: self.k]
            if not hits:
                out.append([])
                zero_shot_rows.append(row)
                continue
            tags = vote([h.labels for h in hits], [h.score for h in hits], threshold=self.threshold,
                        temperature=self.temperature)
            out.append([{"label": label, "score": round(conf, 4), "method": "knn",
                         "neighbours": [hits[i].id for i in idx]} for label, conf, idx in tags])
        if zero_shot_rows and self.prompts:
            for row, tags in zip(zero_shot_rows, self.zero_shot(vectors[zero_shot_rows]), strict=True):
                out[row] = tags
        near = ([next((h for h in hits if h.id != own[row]), None) for row, hits in enumerate(results[1])]
                if nearest else [None] * len(vectors))
        return out, near

    def zero_shot(self, vectors: np.ndarray) -> list[list[dict[str, Any]]]:
        """Tags from the prompts alone: softmax over labels of the scaled best prompt similarity."""
        text, prompts, labels = self._text_embeddings()
        sims = np.asarray(vectors, dtype=np.float32) @ text.T  # (n, prompts)
        label_of = np.array([labels.index(p.label) for p in prompts])
        out: list[list[dict[str, Any]]] = []
        for row in sims:
            best_prompt = np.full(len(labels), -1)
            best = np.full(len(labels), -np.inf)
            for j, s in enumerate(row):
                if s > best[label_of[j]]:
                    best[label_of[j]], best_prompt[label_of[j]] = s, j
            logits = CLIP_LOGIT_SCALE * (best - best.max())
            probs = np.exp(logits) / np.exp(logits).sum()
            top = int(probs.argmax())
            if probs[top] >= self.threshold:
                out.append([{"label": labels[top], "score": round(float(probs[top]), 4), "method": "zero-shot",
                             "prompt": prompts[int(best_prompt[top])].text}])
            else:
                out.append([])
        return out

    def _text_embeddings(self) -> tuple[np.ndarray, list[Prompt], list[str]]:
        if self._text is None:
            try:
                text = np.asarray(self.embedder.embed_texts([p.text for p in self.prompts]), dtype=np.float32)
            except ModelError:
                raise
            except Exception as err:  # a model bug must name the model, not crash the batch obscurely
                raise ModelError(f"model {self.embedder.name} failed to embed the tag prompts: "
                                 f"{err}") from err
            labels = list(dict.fromkeys(p.label for p in self.prompts))
            self._text = (text, list(self.prompts), labels)
        return self._text


# -- re-tagging stored points, resumably ----------------------------------------------------------------
@dataclass
class RetagStats:
    seen: int = 0  # points considered in this run
    skipped: int = 0  # already done by an interrupted earlier run
    tagged: int = 0  # got at least one tag
    untagged: int = 0  # left (or made) without tags
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "tagged": self.tagged, "untagged": self.untagged,
                "resumed": self.resumed}


def checkpoint_path(settings: Settings, collection: str) -> Path:
    return Path(settings.data_dir) / "checkpoints" / f"tag-{collection}.ids"


def retag(store: Store, tagger: Tagger, settings: Settings, *, restart: bool = False, include_labelled: bool = False,
          batch: int = 256, on_batch: Callable[[RetagStats], None] | None = None) -> RetagStats:
    """Recompute ``tags`` of stored points (only unlabelled ones unless ``include_labelled``).

    Resumable: ids finished are appended to ``checkpoint_path`` after each batch; a later call skips them
    (``restart=True`` forgets them). The checkpoint is removed once every point is done.
    """
    ckpt = checkpoint_path(settings, store.collection)
    if restart and ckpt.exists():
        ckpt.unlink()
    done: set[str] = set()
    stats = RetagStats()
    if ckpt.exists():
        done = {line.strip() for line in ckpt.read_text(encoding="utf-8").splitlines() if line.strip()}
        stats.resumed = True
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.open("a", encoding="utf-8") as log_file:
        for ids in _pending(store, done, include_labelled, batch, stats):
            records = [r for r in store.retrieve(ids, with_vectors=True) if r.vector is not None]
            if not records:
                continue
            vectors = np.stack([np.asarray(r.vector, dtype=np.float32) for r in records])
            results = tagger.tag(vectors, exclude_ids=[r.id for r in records])
            # one flush per batch, not per point; the checkpoint is written only after it
            with store.bulk():
                for record, tags in zip(records, results, strict=True):
                    store.set_payload(record.id, {"tags": tags})
                    if tags:
                        stats.tagged += 1
                    else:
                        stats.untagged += 1
            store.flush()
            log_file.write("".join(f"{r.id}\n" for r in records))
            log_file.flush()
            if on_batch is not None:
                on_batch(stats)
    ckpt.unlink(missing_ok=True)
    return stats


def _pending(store: Store, done: set[str], include_labelled: bool, batch: int,
             stats: RetagStats) -> Iterator[list[str]]:
    """Ids still to tag, in batches. The scroll reads payloads only; vectors come per batch."""
    ids: list[str] = []
    for record in store.scroll(with_vectors=False, batch=max(batch, 64)):
        if not include_labelled and record.payload.get("labels"):
            continue
        if record.id in done:
            stats.skipped += 1
            continue
        stats.seen += 1
        ids.append(record.id)
        if len(ids) >= batch:
            yield ids
            ids = []
    if ids:
        yield ids


__all__ = ["TAG_TEMPERATURE", "Prompt", "RetagStats", "Tagger", "checkpoint_path", "load_prompts", "parse_prompts",
           "retag", "vote"]
