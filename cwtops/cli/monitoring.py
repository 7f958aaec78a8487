"""`cwtops challenger set|remove`, `cwtops shadow run|report`, `cwtops drift run`, `cwtops feedback FILE`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from cwtops.cli.options import ParamsOption
from cwtops.core.config import load_params

challenger_app = typer.Typer(help="The `challenger` alias: a version Triton serves beside production, scored in shadow.",
                             no_args_is_help=True)
shadow_app = typer.Typer(help="Shadow scoring: the challenger answers the logged production traffic.", no_args_is_help=True)
drift_app = typer.Typer(help="Drift: logged inputs against production's training data.", no_args_is_help=True)


@challenger_app.command("set")
def challenger_set(version: int = typer.Argument(..., help="model version to serve as the challenger"),
                   params_path: Path = ParamsOption) -> None:
    """Set the alias `challenger` on VERSION (what the MLflow UI's alias editor does); the rollout serves it."""
    from cwtops.registry.versions import CHALLENGER_ALIAS, promote

    params = load_params(params_path)
    promote(params, version, CHALLENGER_ALIAS)
    typer.echo(f"version {version} of {params.base.model_name} is now 'challenger'")


@challenger_app.command("remove")
def challenger_remove(params_path: Path = ParamsOption) -> None:
    """Remove the alias `challenger`; the rollout retires its version from Triton."""
    from cwtops.registry.versions import CHALLENGER_ALIAS, remove_alias

    params = load_params(params_path)
    version = remove_alias(params, CHALLENGER_ALIAS)
    typer.echo(f"'challenger' removed from version {version}" if version else "no version carries 'challenger'")


@shadow_app.command("run")
def shadow_run(params_path: Path = ParamsOption) -> None:
    """One shadow pass now over the production traffic logged since the last one."""
    from cwtops.monitoring.shadow import shadow_pass

    result = shadow_pass(load_params(params_path))
    if result.action != "scored":
        typer.echo(f"shadow: {result.action}: {result.reason}")
        return
    typer.echo(f"shadow: challenger v{result.challenger} vs production v{result.production}: {result.signals} signals, "
               f"agreement {result.agreement:.4f}, confidence difference {result.confidence_delta:+.4f} "
               f"(all {result.total_signals}: {result.total_agreement:.4f}, {result.total_confidence_delta:+.4f})")


@shadow_app.command("report")
def shadow_report(params_path: Path = ParamsOption) -> None:
    """Every version scored in shadow: signals, agreement with production, confidence difference."""
    from cwtops.monitoring.shadow import report

    rows = report(load_params(params_path))
    if not rows:
        typer.echo("no version has been scored in shadow; set a challenger (`cwtops challenger set N`) and let traffic arrive")
        return
    typer.echo(f"{'version':>7}  {'aliases':<21}  {'vs production':>13}  {'signals':>8}  {'agreement':>9}  {'conf. diff':>10}  last pass")
    for row in rows:
        typer.echo(f"{row['version']:>7}  {','.join(row['aliases']) or '-':<21}  {'v' + row['shadow_production_version']:>13}  "
                   f"{row['shadow_signals']:>8}  {float(row['shadow_agreement']):>9.4f}  {float(row['shadow_confidence_delta']):>+10.4f}  "
                   f"{row['shadow_time']}")


@drift_app.command("run")
def drift_run(
    params_path: Path = ParamsOption,
    event: bool = typer.Option(True, help="emit the Prefect event `cwtops.drift.detected` on drift (starts retraining)"),
) -> None:
    """One drift pass now over the signals logged since the last one."""
    from cwtops.monitoring.drift import drift_pass

    result = drift_pass(load_params(params_path), emit=event)
    if result.action != "judged":
        typer.echo(f"drift: {result.action}: {result.reason}")
        return
    verdict = "DRIFT" if result.drifted else "no drift"
    typer.echo(f"drift: {verdict} on version {result.version}: {result.signals} signals, worst PSI {result.worst_psi:.3f} "
               f"({result.worst_feature}; threshold {result.threshold}); MLflow run {result.run_id}"
               + (f"; event {result.event_id}" if result.event_id else ""))
    for feature, value in sorted(asdict(result)["psi"].items(), key=lambda item: -item[1]):
        typer.echo(f"  {feature:<15} {value:.4f}")


def feedback_command(file: Path = typer.Argument(..., help="CSV with request_id,label (and row for multi-signal requests)"),
                     params_path: Path = ParamsOption) -> None:
    """Labels for served requests: live accuracy per version, recorded in MLflow."""
    from cwtops.monitoring.feedback import apply_feedback

    result = apply_feedback(load_params(params_path), file)
    for entry in result.versions:
        typer.echo(f"version {entry.version}: live accuracy {entry.accuracy:.4f} ({entry.correct}/{entry.labelled} labelled signals)")
    if result.unmatched:
        typer.echo(f"{result.unmatched} of {result.labels} labels match no logged request (monitoring.sample_rate logs a share of them)")


def register(app: typer.Typer) -> None:
    app.add_typer(challenger_app, name="challenger")
    app.add_typer(shadow_app, name="shadow")
    app.add_typer(drift_app, name="drift")
    app.command("feedback")(feedback_command)
