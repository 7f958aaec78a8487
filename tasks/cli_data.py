"""`cwtops data sample|import-ucr`."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.data import import_ucr, write_sample_dataset

data_app = typer.Typer(help="Create or import raw signals (data/raw/<class>/*.npy).", no_args_is_help=True)


@data_app.command("sample")
def sample(
    out: Path = typer.Option(Path("data/raw"), "--out", help="raw data folder to write"),
    seed: int = typer.Option(42, help="random seed: the same seed writes the same bytes"),
) -> None:
    """Write the embedded 5-class, imbalanced sample dataset."""
    counts = write_sample_dataset(out, seed=seed)
    typer.echo(f"wrote {sum(counts.values())} signals to {out}: {counts}")


@data_app.command("import-ucr")
def import_ucr_command(
    train: Path = typer.Argument(..., help="UCR TRAIN file (.ts, .tsv or .arff)"),
    test: Path | None = typer.Argument(None, help="UCR TEST file: becomes the fixed test split"),
    out: Path = typer.Option(Path("data/raw"), "--out", help="raw data folder to write"),
) -> None:
    """Convert UCR archive files into the raw layout (fixed test split in <out>/test/)."""
    counts = import_ucr(train, test, out)
    for split, per_class in counts.items():
        typer.echo(f"{split}: {per_class}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
