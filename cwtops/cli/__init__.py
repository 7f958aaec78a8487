"""The commands that need no stage or flow (flows/cli.py adds those)."""
