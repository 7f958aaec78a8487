"""`cwtops`: the command line. Each area registers its own commands; errors exit non-zero.

The commands that run stages or flows (`stage`, `init`, `rollout`, `run`, `serve`, `bench`) are
added by flows/cli.py, the installed entry point: the package never imports orchestration."""

from __future__ import annotations

import sys

import typer

from cwtops.core.errors import CwtopsError

app = typer.Typer(
    name="cwtops",
    help="Train, validate, register and serve a hybrid CWT-CNN signal classifier.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    from cwtops.cli import data as cli_data
    from cwtops.cli import monitoring as cli_monitoring
    from cwtops.cli import tracking as cli_mlflow
    from cwtops.cli import triton as cli_triton
    from cwtops.cli import variants as cli_variants
    from cwtops.cli import weights as cli_weights

    for module in (cli_weights, cli_data, cli_mlflow, cli_triton, cli_variants, cli_monitoring):
        module.register(app)


_register_all()


def main() -> None:
    try:
        app()
    except CwtopsError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
