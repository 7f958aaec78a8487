"""`cwtops weights generate|check`: write a real CWT filter bank, or check a weight file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from cwtops.data.weights import (
    DEFAULT_FIRST_LAYER,
    DEFAULT_LAST_LAYER,
    DEFAULT_SCALES,
    DEFAULT_W0,
    generate_filter_bank,
    parse_weight_file,
    summarize,
    write_weight_file,
)

weights_app = typer.Typer(help="Generate or check a CWT weight file (layers conv5 .. conv116).", no_args_is_help=True)


class Wavelet(str, Enum):
    morlet = "morlet"
    ricker = "ricker"


@weights_app.command("generate")
def generate(
    out: Path = typer.Option(Path("my.txt"), "--out", help="where to write the weight file (atomically)"),
    scales: int = typer.Option(DEFAULT_SCALES, "--scales", min=1, help="number of filters: layers conv5 .. conv{4+scales}"),
    wavelet: Wavelet = typer.Option(Wavelet.morlet, "--wavelet", help="mother wavelet"),
    w0: list[float] = typer.Option(list(DEFAULT_W0), "--w0",
                                   help="Morlet w0 (quality factor), repeat for values the scales take in turn"),
) -> None:
    """Write a real CWT filter bank in PyTorch's tensor print format, full float32 precision."""
    bank, header = generate_filter_bank(scales=scales, wavelet=wavelet.value, w0=w0)
    write_weight_file(out, bank, header)
    typer.echo(
        f"wrote {out}: {len(bank.names)} {wavelet.value} filters {bank.names[0]} .. {bank.names[-1]}, "
        f"lengths {min(bank.lengths)} .. {max(bank.lengths)}, centre frequencies "
        f"{header['centre_frequencies'][0]:.3g} .. {header['centre_frequencies'][-1]:.3g} cycles/sample"
    )


@weights_app.command("check")
def check(
    path: Path = typer.Argument(..., help="weight file to check"),
    first_layer: int = typer.Option(DEFAULT_FIRST_LAYER, "--first-layer", help="first expected layer number"),
    last_layer: int = typer.Option(DEFAULT_LAST_LAYER, "--last-layer", help="last expected layer number"),
) -> None:
    """Parse a weight file and print a summary; exit non-zero, with the reason, if it is unusable."""
    summary = summarize(parse_weight_file(path, first_layer, last_layer))
    typer.echo(f"{path}: {summary['layers']} layers, {summary['first']} .. {summary['last']}")
    typer.echo(f"  filter lengths {summary['min_length']} .. {summary['max_length']}")
    typer.echo(f"  L2 norms {summary['min_norm']:.6g} .. {summary['max_norm']:.6g}")
    typer.echo(f"  sha256 {summary['sha256']}")


def register(app: typer.Typer) -> None:
    """Add the `weights` commands to the main app."""
    app.add_typer(weights_app, name="weights")
