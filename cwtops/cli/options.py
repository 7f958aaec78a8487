"""Options shared by the commands."""

from __future__ import annotations

import typer

from cwtops.core.config import DEFAULT_PARAMS

ParamsOption = typer.Option(DEFAULT_PARAMS, "--params", help="params file")
