"""Fine-tuning and dimension reduction on FROZEN embeddings, saved as a named sentence-transformers model.

``train_head`` fits a linear projection (``Dense``) on cached, L2-normalised embeddings of a training split
with a metric-learning loss; ``fit_pca`` fits a PCA. Both become ``Dense`` layers appended to the base
model's own module stack, followed by ``Normalize``, and ``save_model`` writes the stack to
``settings.data_dir/"models"/NAME`` — so ``get_embedder(NAME)`` and every command (backfill, search,
evaluate) use it like any other model. ``lookalike.json`` next to it records the base model, the layers,
and the training split (relative paths + SHA-256 of every training image) so an evaluation can prove
it measures on images the head never saw.

Why these choices (measured on Caltech101-dev, see benchmarks/results/evaluate.md):
* The backbone stays frozen: the head trains on CPU in seconds from the embedding cache, and the base
  model's preprocessing (and its ONNX speed) is unchanged.
* The head starts as the identity (or the PCA projection when it reduces the dimension), so training
  refines the pretrained geometry instead of learning one from scratch — with ~4k training images a
  randomly initialised head overfits.
* Loss: proxy-anchor (Kim et al., CVPR 2020) — one learnable proxy per class; robust with few images per
  class and no pair mining. ``supcon`` (supervised contrastive) and ``normsoftmax`` (cosine classifier)
  are kept for comparison.
* PCA as a Dense layer: ``W = components``, ``b = −mean · componentsᵀ``, so ``x Wᵀ + b = (x − mean) Cᵀ``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.lab.datasets import Dataset, load_dataset, stratified_split
from ingest.lab.embedcache import EmbeddingCache, embed_refs, open_cache
from ingest.lab.metrics import encode_labels, l2_normalize, pca_fit, percent, retrieve
from ingest.sources import ImageRef
from search.config import Settings
from search.errors import ConfigError, ModelError
from search.models import INFO_FILE, DenseLayer, clear_embedders, get_embedder, read_model_info

if TYPE_CHECKING:
    from search.models import Embedder

log = logging.getLogger(__name__)

LOSSES = ("proxy-anchor", "supcon", "normsoftmax")


@dataclass(frozen=True)
class Layer(DenseLayer):
    """A Dense layer as ``finetune`` builds it, with what made it: ``kind`` is "pca" or "head"."""

    kind: str


def apply_layers(x: np.ndarray, layers: Sequence[DenseLayer]) -> np.ndarray:
    """What the saved model computes after the base: each Dense, then Normalize — for layers not yet saved
    (a loaded ``format: head`` model does the same in ``search.models.HeadEmbedder.apply_head``)."""
    out = np.asarray(x, dtype=np.float32)
    for layer in layers:
        out = out @ layer.weight.T + layer.bias
    return l2_normalize(out)


def fit_pca(x: np.ndarray, dim: int) -> Layer:
    mean, components = pca_fit(x, dim)
    return Layer(weight=components, bias=-(mean @ components.T).astype(np.float32), kind="pca")


@dataclass
class HeadConfig:
    loss: str = "proxy-anchor"
    dim: int | None = None  # output dimension; default: the input's
    epochs: int = 60
    batch: int = 256
    lr: float = 3e-3
    proxy_lr: float = 1e-2
    weight_decay: float = 1e-4
    margin: float = 0.1  # proxy-anchor δ
    alpha: float = 32.0  # proxy-anchor α (scale)
    temperature: float = 0.1  # supcon τ
    scale: float = 16.0  # normsoftmax s
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch < 2:
            raise ConfigError("--epochs must be ≥ 1 and --batch ≥ 2")


def train_head(x: np.ndarray, labels: np.ndarray, config: HeadConfig, *,
               on_epoch: Callable[[int, float], None] | None = None) -> Layer:
    """A linear head trained with ``config.loss`` on rows ``x`` (L2-normalised) with integer ``labels``."""
    import torch
    import torch.nn.functional as F

    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y_np = np.asarray(labels, dtype=np.int64)
    y_t = torch.from_numpy(y_np)
    n, d = x_t.shape
    out_dim = config.dim or d
    n_classes = int(y_np.max()) + 1

    # identity / PCA start: epoch 0 reproduces the pretrained geometry
    if out_dim == d:
        w0, b0 = np.eye(d, dtype=np.float32), np.zeros(d, dtype=np.float32)
    else:
        pca = fit_pca(x, out_dim)
        w0, b0 = pca.weight, pca.bias
    linear = torch.nn.Linear(d, out_dim)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w0))
        linear.bias.copy_(torch.from_numpy(b0))

    params: list[dict[str, Any]] = [{"params": linear.parameters(), "lr": config.lr,
                                     "weight_decay": config.weight_decay}]
    proxies = None
    if config.loss in ("proxy-anchor", "normsoftmax"):
        with torch.no_grad():  # start each proxy at its class mean (in the head's output space)
            emb = F.normalize(linear(x_t), dim=1)
            means = torch.zeros(n_classes, out_dim).index_add_(0, y_t, emb)
        proxies = torch.nn.Parameter(F.normalize(means + 1e-3 * torch.randn_like(means), dim=1))
        params.append({"params": [proxies], "lr": config.proxy_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(params)
    steps = max(1, n // config.batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)

    for epoch in range(config.epochs):
        order = _class_balanced_order(y_np, rng) if config.loss == "supcon" else rng.permutation(n)
        total = 0.0
        for step in range(steps):
            idx = torch.from_numpy(order[step * config.batch:(step + 1) * config.batch])
            emb = F.normalize(linear(x_t[idx]), dim=1)
            yb = y_t[idx]
            if config.loss == "proxy-anchor":
                loss = _proxy_anchor(emb, yb, proxies, config.alpha, config.margin)
            elif config.loss == "normsoftmax":
                loss = F.cross_entropy(config.scale * emb @ F.normalize(proxies, dim=1).T, yb)
            else:
                loss = _supcon(emb, yb, config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        if on_epoch is not None:
            on_epoch(epoch + 1, total / steps)
    return Layer(weight=linear.weight.detach().numpy().astype(np.float32).copy(),
                 bias=linear.bias.detach().numpy().astype(np.float32).copy(), kind="head")


def _class_balanced_order(labels: np.ndarray, rng: np.random.Generator, per_class: int = 4) -> np.ndarray:
    """A permutation whose consecutive groups hold ``per_class`` items of one class, so every batch has positives."""
    groups: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        groups.extend(rows[i:i + per_class] for i in range(0, len(rows), per_class))
    return np.concatenate([groups[i] for i in rng.permutation(len(groups))])


def _proxy_anchor(emb: Any, labels: Any, proxies: Any, alpha: float, margin: float) -> Any:
    import torch
    import torch.nn.functional as F

    sims = emb @ F.normalize(proxies, dim=1).T  # (b, C)
    pos = F.one_hot(labels, proxies.shape[0]).bool()
    with_pos = pos.any(dim=0)  # proxies of classes present in the batch
    pos_exp = torch.where(pos, torch.exp(-alpha * (sims - margin)), torch.zeros_like(sims)).sum(dim=0)
    neg_exp = torch.where(~pos, torch.exp(alpha * (sims + margin)), torch.zeros_like(sims)).sum(dim=0)
    pos_term = torch.log1p(pos_exp[with_pos]).sum() / with_pos.sum().clamp(min=1)
    neg_term = torch.log1p(neg_exp).sum() / proxies.shape[0]
    return pos_term + neg_term


def _supcon(emb: Any, labels: Any, temperature: float) -> Any:
    import torch

    logits = emb @ emb.T / temperature
    self_mask = torch.eye(len(emb), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    per_anchor = -(log_prob * pos).sum(dim=1)[has] / n_pos[has]
    return per_anchor.mean()


# -- saving a named model ----------------------------------------------------------------------------------
def model_dir(settings: Settings, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "+" in name:
        raise ConfigError(f"--name {name!r}: use a plain folder name (letters, digits, - and _), no '/' or '+'")
    return Path(settings.data_dir) / "models" / name


@dataclass
class ModelInfo:
    """What ``lookalike.json`` records next to a saved model."""

    name: str
    base: str
    dim: int
    layers: list[dict[str, Any]]
    split: dict[str, Any] = field(default_factory=dict)  # fraction, seed, dataset, train (relative paths), train_sha256
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = "stack"  # stack: a full sentence-transformers folder | head: head/ on the named base
    created: float = field(default_factory=time.time)


def save_model(embedder: Embedder, layers: Sequence[Layer], folder: Path, info: ModelInfo, *,
               overwrite: bool = False) -> Path:
    """Base modules + one ``Dense`` per layer + ``Normalize``, saved as a sentence-transformers folder.

    A combined base (``a+b``) has no single module stack; then the folder holds ``head/`` (a
    sentence-transformers stack of just the Dense layers + Normalize) and ``lookalike.json`` names the base
    (``"format": "head"``): ``search.models.get_embedder`` puts the two together.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(f"model folder {folder} exists; pass --overwrite or choose another --name")
    dense = [Dense(layer.in_features, layer.out_features, bias=True, activation_function=torch.nn.Identity(),
                   init_weight=torch.from_numpy(np.ascontiguousarray(layer.weight)),
                   init_bias=torch.from_numpy(np.ascontiguousarray(layer.bias))) for layer in layers]
    try:
        base_model = embedder.model
    except ModelError:  # a combination (a+b) or a head on one
        base_model = None
    if base_model is not None:
        base_modules = [m for _, m in base_model.named_children()]
        # the head was trained on L2-normalised vectors: make sure it gets them (CLIP stacks end unnormalised)
        if not isinstance(base_modules[-1], Normalize):
            base_modules.append(Normalize())
        model = SentenceTransformer(modules=[*base_modules, *dense, Normalize()], device="cpu")
        info.format = "stack"
    else:
        model = SentenceTransformer(modules=[*dense, Normalize()], device="cpu")
        info.format = "head"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    card_log = logging.getLogger("sentence_transformers.base.model_card")
    level = card_log.level
    card_log.setLevel(logging.ERROR)  # its usage snippet assumes a text model and warns for image stacks
    try:
        model.save(str(tmp / "head") if info.format == "head" else str(tmp))
    finally:
        card_log.setLevel(level)
    (tmp / INFO_FILE).write_text(json.dumps(asdict(info), indent=1), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)  # a half-written model never appears under its name
    return folder


def read_info(folder: Path) -> dict[str, Any] | None:
    """The ``lookalike.json`` of a saved model folder, or None."""
    return read_model_info(Path(folder))


# -- the command's work -------------------------------------------------------------------------------------
def finetune(dataset: Path, *, name: str, base: str, settings: Settings, split: float, seed: int,
             pca_dim: int | None, head: bool, config: HeadConfig, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Fit PCA and/or a head on the training split of ``dataset`` (embedded with ``base``, cached), measure
    before/after on the held-out split, save as ``name``, check the saved model reproduces the vectors and
    pre-fill its embedding cache. Returns a summary (also stored in ``lookalike.json``)."""
    if not head and not pca_dim:
        raise ConfigError("nothing to train: pass --pca N and/or --head")
    folder = model_dir(settings, name)
    if folder.exists() and not overwrite:
        raise ConfigError(f"model {name!r} exists at {folder}; pass --overwrite or choose another --name")
    if name == base:
        raise ConfigError(f"--name {name!r} is the base model's name; choose a new name")
    config.check()
    embedder = get_embedder(base, settings)
    if pca_dim is not None and not 0 < pca_dim < embedder.dim:
        raise ConfigError(f"--pca {pca_dim}: choose a dimension between 1 and {embedder.dim - 1}")
    data = load_dataset(dataset, embedder, settings, open_cache(embedder, settings, True), progress=progress)
    train_rows, held_rows = stratified_split(data.classes, data.keys, split, seed)
    codes, _ = encode_labels(data.classes)

    t0 = time.perf_counter()
    history: list[float] = []
    layers = _train_layers(data.vectors[train_rows], codes[train_rows], pca_dim=pca_dim, head=head, config=config,
                           history=history)
    train_s = time.perf_counter() - t0

    new_vectors = apply_layers(data.vectors, layers)
    before = _held_out_figures(data.vectors, codes, train_rows, held_rows)
    after = _held_out_figures(new_vectors, codes, train_rows, held_rows)
    info = ModelInfo(
        name=name, base=embedder.name, dim=layers[-1].out_features,
        layers=[{"kind": layer.kind, "in": layer.in_features, "out": layer.out_features} for layer in layers],
        split={"dataset": str(data.root), "fraction": split, "seed": seed,
               "train": [data.keys[i] for i in train_rows], "train_sha256": [data.sha256[i] for i in train_rows]},
        config={**asdict(config), "pca": pca_dim, "head": head, "loss_history": history, "train_s": round(train_s, 2)},
        metrics={"held_out_before": before, "held_out_after": after})
    save_model(embedder, layers, folder, info, overwrite=overwrite)
    verified, cosine = _verify_and_prefill(name, data, new_vectors, settings)
    return {"name": name, "path": str(folder), "base": embedder.name, "dim": layers[-1].out_features,
            "format": info.format, "train": len(train_rows), "held_out": len(held_rows), "before": before,
            "after": after, "train_s": round(train_s, 2), "verified": verified, "min_cosine": round(cosine, 6)}


def _train_layers(x_train: np.ndarray, y_train: np.ndarray, *, pca_dim: int | None, head: bool, config: HeadConfig,
                  history: list[float]) -> list[Layer]:
    """The PCA (if asked), then the head (if asked) trained on the PCA's output; epoch losses go to ``history``."""
    layers: list[Layer] = []
    if pca_dim:
        layers.append(fit_pca(x_train, pca_dim))
    if head:
        layers.append(train_head(apply_layers(x_train, layers), y_train, config,
                                 on_epoch=lambda epoch, loss: history.append(round(loss, 5))))
    return layers


def _held_out_figures(vectors: np.ndarray, codes: np.ndarray, train_rows: np.ndarray,
                      held_rows: np.ndarray) -> dict[str, float]:
    """top-1, P@4 and mAP@10 of the held-out rows queried against the training rows."""
    r = retrieve(vectors[train_rows], codes[train_rows], vectors[held_rows], codes[held_rows],
                 exclude_self=False, n_classes=int(codes.max()) + 1)
    return {"top1": percent(r.top1.mean()), "book_precision_at_4": percent(r.p4.mean()),
            "map_at_10": percent(r.ap10.mean())}


def _verify_and_prefill(name: str, data: Dataset, new_vectors: np.ndarray, settings: Settings) -> tuple[bool, float]:
    """The saved model must compute what was measured: embed a few images through it and compare. If it does,
    its cache is the head applied to the cached base vectors. Returns (verified, lowest cosine)."""
    clear_embedders()
    saved = get_embedder(name, settings)
    sample = np.linspace(0, len(data) - 1, num=min(4, len(data))).astype(int)
    check = embed_refs([ImageRef(data.uris[i]) for i in sample], saved, settings, cache=None)
    cosine = float(np.min(np.sum(check.vectors * new_vectors[sample], axis=1))) if len(check.uris) else 0.0
    verified = cosine > 0.999
    if verified:
        cache = EmbeddingCache.for_embedder(saved, settings)
        cache.prefill(data.uris, data.sha256, new_vectors)
        cache.close()
    else:
        log.warning("model %s reproduces the trained vectors only to cosine %.4f", name, cosine)
    return verified, cosine


__all__ = ["LOSSES", "HeadConfig", "Layer", "ModelInfo", "apply_layers", "finetune", "fit_pca", "model_dir",
           "read_info", "save_model", "train_head"]
