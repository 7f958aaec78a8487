"""`cwtops data sample|import-ucr`: write raw signals in the layout the pipeline reads."""

from __future__ import annotations

from pathlib import Path

import typer

from cwtops.data.signals import SAMPLE_COUNTS, equal_counts, import_ucr, write_sample_dataset

data_app = typer.Typer(help="Create or import raw signals (data/raw/<class>/*.npy).", no_args_is_help=True)


@data_app.command("sample")
def sample(
    out: Path = typer.Option(Path("data/raw"), "--out", help="raw data folder to write (replaced as a whole)"),
    seed: int = typer.Option(42, "--seed", help="random seed: the same seed writes the same bytes"),
    signals: int | None = typer.Option(
        None, "--signals", help="write this many signals, split evenly between the classes (a scale test set); "
        "default: the imbalanced 2,220-signal sample"),
    shard: int = typer.Option(100, "--shard", min=1, help="signals per .npy file ([shard, 2048] float32)"),
) -> None:
    """Write the embedded 5-class sample dataset (length-2048 float32 signals).

    By default the imbalanced 2,220-signal set the pipeline ships with; `--signals 1000000 --shard 10000`
    writes a balanced million-signal set (8 GB) in 100 files, generated in bounded memory.
    """
    counts = write_sample_dataset(out, seed=seed, counts=SAMPLE_COUNTS if signals is None else equal_counts(signals),
                                  chunk=shard)
    typer.echo(f"wrote {sum(counts.values())} signals to {out}: {counts}")


@data_app.command("import-ucr")
def import_ucr_command(
    train: Path = typer.Argument(..., help="UCR TRAIN file (.ts, .tsv, .txt or .arff)"),
    test: Path | None = typer.Argument(None, help="UCR TEST file: becomes the fixed test split in <out>/test/"),
    out: Path = typer.Option(Path("data/raw"), "--out", help="raw data folder to write (replaced as a whole)"),
) -> None:
    """Convert UCR archive files into the raw layout.

    Class folders come from the labels: numeric labels get a prefix (1 -> class_1, -1 -> class_-1),
    safe names stay as they are, anything else becomes class_<label with '_' for other characters>.
    The mapping is saved in <out>/.ucr_labels.json.
    """
    counts = import_ucr(train, test, out)
    for split, per_class in counts.items():
        typer.echo(f"{split}: {sum(per_class.values())} series {per_class}")


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the main app."""
    app.add_typer(data_app, name="data")
