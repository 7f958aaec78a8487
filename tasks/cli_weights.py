"""`cwtops weights generate|check`."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.weights import generate_filter_bank, parse_weight_file, summarize, write_weight_file

weights_app = typer.Typer(help="Generate or check a CWT weight file (layers conv5..conv116).", no_args_is_help=True)


@weights_app.command("generate")
def generate(
    out: Path = typer.Option(Path("my.txt"), "--out", help="where to write the weight file"),
    scales: int = typer.Option(112, help="number of filters (layers conv5 .. conv{4+scales})"),
    wavelet: str = typer.Option("morlet", help="morlet | ricker"),
) -> None:
    """Write a real CWT filter bank in PyTorch's tensor print format."""
    bank, header = generate_filter_bank(scales=scales, wavelet=wavelet)  # type: ignore[arg-type]
    write_weight_file(out, bank, header)
    lengths = bank.lengths
    typer.echo(f"wrote {out}: {len(bank.names)} {wavelet} filters {bank.names[0]}..{bank.names[-1]}, lengths {min(lengths)}..{max(lengths)}")


@weights_app.command("check")
def check(path: Path = typer.Argument(..., help="weight file to check")) -> None:
    """Parse a weight file and print a summary; exit non-zero with the reason if it is unusable."""
    summary = summarize(parse_weight_file(path))
    typer.echo(f"{path}: {summary['layers']} layers, {summary['first']} .. {summary['last']}")
    typer.echo(f"  filter lengths {summary['min_length']} .. {summary['max_length']}")
    typer.echo(f"  L2 norms {summary['min_norm']:.6g} .. {summary['max_norm']:.6g}")
    typer.echo(f"  sha256 {summary['sha256']}")


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
