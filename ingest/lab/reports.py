"""How ``evaluate`` shows its results: the text table on stdout, JSON without NaN, and ``--out``'s report.md
with its PNG plots (PCA sweep, worst classes, a 2-D map of the worst classes and their confusers; matplotlib
with the Agg backend, t-SNE from scikit-learn).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ingest.lab.metrics import VOTE_RULE, pca_apply, pca_fit
from ingest.lab.nearduplicates import NEAR_COPY_COSINE

if TYPE_CHECKING:
    from ingest.lab.evaluation import ModelRun


# ---------------------------------------------------------------------------------------------- text
def seconds_text(timings: dict[str, float]) -> str:
    """``{"embed": 0.01, "search": 0.0}`` → ``embed 0.01 s, search 0.00 s``."""
    return ", ".join(f"{step.replace('_', ' ')} {secs:.2f} s" for step, secs in timings.items())


def print_table(runs: list[ModelRun]) -> None:
    """The comparison table, then a few lines per model, on stdout."""
    # the figures are averages over the queries (all images, the held-out part, or --queries), so count those
    head = f"{'model':<40} {'queries':>7} {'P@4':>6} {'bal.':>6} {'top1':>6} {'top5':>6} {'mAP10':>6} " \
           f"{'tagacc':>6} {'tagcov':>6}"
    click.echo(head)
    for run in runs:
        r = run.result
        click.echo(f"{r['model'][:40]:<40} {r['queries']:>7} {r['book_precision_at_4']:>6.2f} "
                   f"{r['class_balanced_precision_at_4']:>6.2f} {r['top1']:>6.2f} {r['top5']:>6.2f} "
                   f"{r['map_at_10']:>6.2f} {r['tag_accuracy']:>6.2f} {r['tag_coverage']:>6.2f}")
    for run in runs:
        r = run.result
        click.echo(f"\n{r['model']} — {r['mode']}; {r['queries']} queries, index {r['index']}; {r['vote']}")
        click.echo("  worst classes (P@4, most confused with): " + ", ".join(
            f"{w['class']} {w['precision_at_4']:.0f} ({w['confused_with'] or '-'})" for w in r["worst_classes"]))
        click.echo("  PCA: " + ", ".join(f"{p['dim']}→{p['book_precision_at_4']:.2f}" for p in r["pca"]))
        for s in r.get("store", []):
            click.echo(f"  store quantization={s['quantization']}: recall@10 HNSW {s['recall_at_10_hnsw']:.4f}, "
                       f"top-1 {s['top1']:.2f}, P@4 {s['book_precision_at_4']:.2f}, build {s['build_s']} s, "
                       f"single query p50 {s['single_query_p50_ms']} ms")
        if r.get("near_duplicates"):
            nd = r["near_duplicates"]
            click.echo(f"  near-duplicates: {nd['copies']} copies, rank-1 {nd['rank1']:.2f} %, "
                       f"top-10 {nd['top10']:.2f} %; originals without a near copy in the set "
                       f"({nd['unique_originals']}): rank-1 {nd['rank1_unique'] or 0:.2f} %")
        click.echo(f"  seconds: {seconds_text(r['seconds'])}")


def clean_json(value: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- report.md
def write_report(out: Path, runs: list[ModelRun], command: str) -> list[Path]:
    """report.md and PNG plots (matplotlib Agg) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")

    out.mkdir(parents=True, exist_ok=True)
    files = [_plot_pca(out / "pca.png", runs)]
    for n, run in enumerate(runs):
        slug = _slug(n, run)
        files.append(_plot_worst(out / f"worst-{slug}.png", run))
        if run.map_points is not None:
            files.append(out / f"map-{slug}.png")
            _plot_map(*run.map_points, files[-1], run.result["model"])
    files.append(out / "report.md")
    files[-1].write_text("\n".join(_markdown(runs, command)), encoding="utf-8")
    return files


def _slug(n: int, run: ModelRun) -> str:
    return f"{n}-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.result["model"])


def _markdown(runs: list[ModelRun], command: str) -> list[str]:
    lines = ["# lookalike evaluate", "", f"Command: `{command}`", "",
             f"kNN accuracy: {VOTE_RULE}. Percentages.", "",
             "| model | dim | mode | images | queries | book P@4 | class-bal. P@4 | top-1 | top-5 | mAP@10 "
             "| tag acc. | tag cov. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = run.result
        lines.append(f"| {r['model']} | {r['dim']} | {r['mode']} | {r['images']} | {r['queries']} | "
                     f"{r['book_precision_at_4']:.2f} | {r['class_balanced_precision_at_4']:.2f} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {r['map_at_10']:.2f} | {r['tag_accuracy']:.2f} | {r['tag_coverage']:.2f} |")
    for n, run in enumerate(runs):
        lines += _model_section(n, run)
    return [*lines, "", "![PCA](pca.png)", ""]


def _model_section(n: int, run: ModelRun) -> list[str]:
    r = run.result
    lines = ["", f"## {r['model']}", "", f"Preprocessing `{r['preprocessing']}`; auto-tags: k={r['tag_k']}, "
             f"threshold {r['tag_threshold']}. Seconds: {seconds_text(r['seconds'])}.", "",
             "### Worst classes", "", "| class | queries | P@4 | top-1 | most confused with |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['class']} | {row['queries']} | {row['precision_at_4']:.1f} | {row['top1']:.1f} | "
              f"{row['confused_with'] or '-'} |" for row in r["worst_classes"]]
    lines += ["", "### PCA", "", "| dims | book P@4 | top-1 | mAP@10 |", "|---|---|---|---|"]
    lines += [f"| {row['dim']} | {row['book_precision_at_4']:.2f} | {row['top1']:.2f} | {row['map_at_10']:.2f} |"
              for row in run.pca_rows]
    if r.get("store"):
        lines += ["", "### Exact vs HNSW (embedded store)", "",
                  "| quantization | recall@10 HNSW | book P@4 (store) | top-1 (store) | build s | "
                  "ms/query batch HNSW | ms/query batch exact | single p50 ms | single p95 ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['quantization']} | {s['recall_at_10_hnsw']:.4f} | {s['book_precision_at_4']:.2f} | "
                  f"{s['top1']:.2f} | {s['build_s']} | {s['batch_ms_per_query_hnsw']} | "
                  f"{s['batch_ms_per_query_exact']} | {s['single_query_p50_ms']} | {s['single_query_p95_ms']} |"
                  for s in r["store"]]
    if r.get("near_duplicates"):
        nd = r["near_duplicates"]
        lines += ["", f"### Near-duplicates ({nd['alterations']})", "",
                  f"{nd['copies']} altered copies: original (or a pixel-identical copy) at rank 1 in "
                  f"{nd['rank1']:.2f} %, in the top 10 in {nd['top10']:.2f} %; for the {nd['unique_originals']} "
                  f"originals without a near copy in the set (cosine < {NEAR_COPY_COSINE}): rank 1 in "
                  f"{nd['rank1_unique'] or 0:.2f} %."]
    slug = _slug(n, run)
    lines += ["", f"![worst classes](worst-{slug}.png)"]
    if run.map_points is not None:
        lines += [f"![map of the worst classes](map-{slug}.png)"]
    return lines


# ---------------------------------------------------------------------------------------------- plots
def _plot_pca(path: Path, runs: list[ModelRun]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        dims = [row["dim"] for row in run.pca_rows]
        ax.plot(dims, [row["book_precision_at_4"] for row in run.pca_rows], marker="o", label=run.result["model"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dimensions (PCA fitted on the index)")
    ax.set_ylabel("book precision@4 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_worst(path: Path, run: ModelRun) -> Path:
    import matplotlib.pyplot as plt

    worst = run.per_class_rows[:15]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(worst) + 1))
    ax.barh([row["class"] for row in worst][::-1], [row["precision_at_4"] for row in worst][::-1])
    ax.set_xlabel("precision@4 (%)")
    ax.set_title(f"worst classes — {run.result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_map(vectors: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    if len(vectors) > 30:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=0,
                  perplexity=min(30.0, (len(vectors) - 1) / 3)).fit_transform(vectors)
        how = "t-SNE"
    else:
        mean, comps = pca_fit(vectors, 2)
        xy = pca_apply(vectors, mean, comps, normalize=False)
        how = "PCA"
    fig, ax = plt.subplots(figsize=(6, 5))
    for name in sorted(set(classes)):
        m = np.array([c == name for c in classes])
        ax.scatter(xy[m, 0], xy[m, 1], s=10, label=name)
    ax.legend(fontsize=6, markerscale=1.5)
    ax.set_title(f"{how} of the 5 worst classes and their confusers — {title}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["clean_json", "print_table", "seconds_text", "write_report"]
