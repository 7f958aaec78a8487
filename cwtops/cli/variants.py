"""`cwtops variants build|register`: INT8 / FP16 / graph-optimised variants of the ONNX export."""

from __future__ import annotations

from pathlib import Path

import typer

from cwtops.cli.options import ParamsOption
from cwtops.core.config import load_params

VariantOption = typer.Option(None, "--variant", "-v", help="optimized | int8 | fp16 (repeat it; default: all)")
variants_app = typer.Typer(
    help="Smaller and faster variants of the float32 ONNX export, measured and gated.", no_args_is_help=True
)


def _check_names(names: list[str] | None) -> tuple[str, ...] | None:
    from cwtops.core.errors import CwtopsError
    from cwtops.variants import VARIANTS

    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        raise CwtopsError(f"unknown variant(s) {unknown}; variants are: {', '.join(VARIANTS)}")
    return tuple(names) if names else None


@variants_app.command("build")
def build_command(
    params_path: Path = ParamsOption,
    variant: list[str] | None = VariantOption,
    repeats: int | None = typer.Option(None, help="timing rounds (default: variants.repeats)"),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads for timing (0: all cores)"),
) -> None:
    """Build, score on the test split, time side by side with float32 and gate every variant."""
    import json

    from cwtops.core.config import VariantsConfig
    from cwtops.variants import build

    params = load_params(params_path)
    overrides = {"variants": _check_names(variant), "repeats": repeats, "threads": threads}
    settings = params.variants.model_dump() | {key: value for key, value in overrides.items() if value is not None}
    result = build(params, VariantsConfig(**settings))  # validated again: a bad override names its key
    models = json.loads(result.report.read_text())["models"]
    typer.echo(f"{'model':<10} {'accuracy':>8} {'drop pts':>8} {'agree':>7} {'x b64':>6} {'x b1':>6} {'KiB':>6}  gate")
    for name, entry in models.items():
        verdict = "-" if name == "float32" else ("pass" if entry["gate"]["passed"] else "FAIL: " + "; ".join(entry["gate"]["reasons"]))
        typer.echo(
            f"{name:<10} {entry['accuracy']:>8.4f} {entry['accuracy_drop']:>8.2f} {entry['argmax_agreement']:>7.4f} "
            f"{entry['throughput_speedup']:>6.2f} {entry['latency_speedup']:>6.2f} {entry['size_bytes'] / 1024:>6.0f}  {verdict}"
        )
    typer.echo(f"report: {result.report}")


@variants_app.command("register")
def register_command(params_path: Path = ParamsOption, variant: list[str] | None = VariantOption) -> None:
    """Register the variants that passed their gate as `<model_name>-<variant>` in the float32 model's run."""
    from cwtops.variants import register_variants

    for item in register_variants(load_params(params_path), _check_names(variant)):
        if item.registered:
            state = f"version {item.version}" + (" (already registered)" if item.reason else "")
        else:
            state = f"not registered: {item.reason}"
        typer.echo(f"{item.model_name}: {state}")


def register(app: typer.Typer) -> None:
    """Add `cwtops variants ...` to the `cwtops` app."""
    app.add_typer(variants_app, name="variants")
