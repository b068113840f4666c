"""The lab's commands: ``evaluate`` (retrieval quality of one or more models on an ImageFolder tree) and
``finetune`` (a projection head or PCA on frozen, cached embeddings, saved as a named model), registered on
the root group through the ``lookalike.commands`` entry point.

Results go to stdout (a table, or ``--json``); progress and skipped files go to stderr. The lab's modules
are imported inside the commands, so ``lookalike --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app

PCA_DIMS = (16, 32, 64, 128, 256, 512)


def _dims(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give dimensions like 16,64,256") from None


@click.command("evaluate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "-m", "models", multiple=True,
              help="Model to evaluate (repeat for a comparison table); default: the global --model.")
@click.option("--split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Hold out this fraction of every class as queries against the rest (e.g. 0.33).")
@click.option("--seed", type=int, default=0, help="Seed of the stratified --split.")
@click.option("--queries", "queries_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A separate ImageFolder tree queried against DATASET as the index.")
@click.option("--pca", "pca_dims", default=",".join(map(str, PCA_DIMS)), callback=lambda c, p, v: _dims(v),
              help="PCA dimensions to sweep (empty to skip).")
@click.option("--ann/--no-ann", default=True, help="Compare exact and HNSW search in a temporary embedded store.")
@click.option("--quantization", "quantizations", multiple=True, type=click.Choice(["int8", "binary"]),
              help="Also measure the store with this vector quantization (repeatable).")
@click.option("--near-duplicates", type=int, default=0, help="Also test N altered copies (crop, rotate, jitter, "
              "JPEG q40): is the original found at rank 1?")
@click.option("--tag-threshold", type=click.FloatRange(0, 1), default=None,
              help="Auto-tag confidence threshold to evaluate [default: LOOKALIKE_TAG_THRESHOLD].")
@click.option("--worst", type=int, default=10, help="How many of the worst classes to list.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write report.md and PNG plots here.")
@click.option("--cache/--no-cache", "use_cache", default=True, help="Use the embedding cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model on stdout.")
@pass_app
@handle_errors
def evaluate_cmd(app: AppContext, dataset: Path, models: tuple[str, ...], split: float | None, seed: int,
                 queries_dir: Path | None, pca_dims: list[int], ann: bool, quantizations: tuple[str, ...],
                 near_duplicates: int, tag_threshold: float | None, worst: int, out: Path | None, use_cache: bool,
                 as_json: bool) -> None:
    """Retrieval quality of one or more models on an ImageFolder tree (one folder per class).

    Reports the book protocol (every image queries the rest; share of its 4 nearest other images in its
    class), its class-balanced version, top-1/top-5 kNN accuracy, mAP@10, per-class figures, auto-tag
    accuracy/coverage, a PCA sweep and exact-vs-HNSW search. Embeddings are cached: re-runs are fast.
    """
    from ingest.lab.evaluation import evaluate_model
    from ingest.lab.reports import clean_json, print_table, write_report

    if split is not None and queries_dir is not None:
        raise click.UsageError("use either --split or --queries, not both")
    settings = app.settings()
    names = list(models) or [settings.model]
    threshold = settings.tag_threshold if tag_threshold is None else tag_threshold
    runs = []
    for name in names:
        click.echo(f"evaluating {name} on {dataset}", err=True)
        runs.append(evaluate_model(name, settings, dataset, queries_dir=queries_dir, split=split, seed=seed,
                                   pca_dims=pca_dims, ann=ann, quantizations=quantizations,
                                   near_duplicates=near_duplicates, worst=worst, use_cache=use_cache,
                                   tag_threshold=threshold, progress=True))
    if out is not None:
        files = write_report(out, runs, "lookalike " + " ".join(sys.argv[1:]))
        click.echo(f"wrote {', '.join(str(f) for f in files)}", err=True)
    if as_json:
        echo_json([clean_json(run.result) for run in runs])
    else:
        print_table(runs)


@click.command("finetune")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Save the model as DATA_DIR/models/NAME (then --model NAME).")
@click.option("--base", default=None, help="Base model [default: the global --model].")
@click.option("--split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.33,
              help="Fraction of every class held out (never seen in training) to measure before/after.")
@click.option("--seed", type=int, default=0, help="Seed of the stratified split.")
@click.option("--pca", "pca_dim", type=int, default=None, help="Reduce to this many dimensions with PCA "
              "(fitted on the training split); without --head only the PCA is saved.")
@click.option("--head/--no-head", default=None, help="Train a projection head [default: yes, unless --pca].")
@click.option("--dim", type=int, default=None, help="Output dimension of the head [default: its input's].")
@click.option("--loss", type=click.Choice(["proxy-anchor", "supcon", "normsoftmax"]), default="proxy-anchor",
              help="Metric-learning loss of the head.")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: the loss's measured best].")
@click.option("--lr", type=float, default=None, help="Learning rate of the head.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model of that name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def finetune_cmd(app: AppContext, dataset: Path, name: str, base: str | None, split: float, seed: int,
                 pca_dim: int | None, head: bool | None, dim: int | None, loss: str, epochs: int | None,
                 lr: float | None, overwrite: bool, as_json: bool) -> None:
    """Train a projection head (and/or a PCA) on frozen, cached embeddings of DATASET's training split
    and save it as a named model usable by every command (--model NAME)."""
    from ingest.lab.finetune import HeadConfig, finetune

    settings = app.settings()
    config = HeadConfig(loss=loss, dim=dim, seed=seed)
    if epochs is not None:
        config.epochs = epochs
    if lr is not None:
        config.lr = lr
    result = finetune(dataset, name=name, base=base or settings.model, settings=settings, split=split, seed=seed,
                      pca_dim=pca_dim, head=(pca_dim is None) if head is None else head, config=config,
                      overwrite=overwrite, progress=True)
    if as_json:
        echo_json(result)
        return
    b, a = result["before"], result["after"]
    click.echo(f"saved {result['name']} ({result['dim']}-d) at {result['path']}")
    click.echo(f"held-out ({result['held_out']} images the model never saw, index = {result['train']} training "
               f"images):")
    for key, label in (("top1", "top-1"), ("book_precision_at_4", "P@4"), ("map_at_10", "mAP@10")):
        click.echo(f"  {label:<7} before {b[key]:6.2f}  after {a[key]:6.2f}")
    if result.get("verified") is False:
        click.echo("warning: the saved model's vectors differ from the trained head's; its cache was not pre-filled",
                   err=True)


def register(group: click.Group) -> None:
    """Entry point (``lookalike.commands``): add evaluate and finetune to the root group."""
    for command in (evaluate_cmd, finetune_cmd):
        group.add_command(command)


__all__ = ["evaluate_cmd", "finetune_cmd", "register"]
