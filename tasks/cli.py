"""`cwtops`: the command line. Each area registers its own commands; errors exit non-zero."""

from __future__ import annotations

import sys

import typer

from tasks.errors import CwtopsError

app = typer.Typer(
    name="cwtops",
    help="Train, validate, register and serve a hybrid CWT-CNN signal classifier.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    from tasks import cli_data, cli_mlflow, cli_pipeline, cli_triton, cli_variants, cli_weights

    for module in (cli_weights, cli_data, cli_pipeline, cli_mlflow, cli_triton, cli_variants):
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
