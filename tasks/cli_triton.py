"""Commands of this area (filled in by its module)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main app."""
