"""The MLflow model registry: register parity-checked ONNX versions, promote, list, fetch, tag.

The alias `production` on a version of `base.model_name` is the single source of truth for what
Triton should serve. Every version is logged into the pipeline's tracked run with MLflow's ONNX
flavour (one `model.onnx`, no external data) and carries, from the moment it is created, tags
that trace it to its run, data, weights and commit, plus the parity reference inputs and outputs
(`extra_files/reference.npz` in the model folder) so a served model can be checked against them,
and the training inputs' statistics (`extra_files/drift_reference.json`) that drift is judged by.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cwtops.core.artifacts import sha256_file
from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import ArtifactPaths, artifact_paths
from cwtops.registry.server import bounded_client_retries, is_connection_error, require_reachable, tracking_uri, unreachable, with_retries

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from mlflow import MlflowClient

ALIAS = "production"
CHALLENGER_ALIAS = "challenger"  # a version served beside production, reached by its own model name
MODEL_NAME_IN_RUN = "model"  # the logged model's name inside the run
REFERENCE_ARTIFACT = "extra_files/reference.npz"  # relative to the model folder
DRIFT_REFERENCE_ARTIFACT = "extra_files/drift_reference.json"  # the training inputs' statistics (drift)
DEPLOYMENT_STATUS_TAG = "deployment_status"  # written by the rollout
LINEAGE_CHECKED = ("data_dvc_md5", "weights_dvc_md5", "split_manifest_sha256", "filter_bank_sha256")


@dataclass(frozen=True)
class RegisterResult:
    version: int
    run_id: str
    onnx_sha256: str
    created: bool  # False when this run's file was registered before


@dataclass(frozen=True)
class VersionFiles:
    version: int
    onnx: Path
    reference: Path
    run_id: str
    tags: dict


# ---------------------------------------------------------------- session


@contextlib.contextmanager
def registry_client(params: Params, attempts: int = 3) -> Iterator[MlflowClient]:
    """A client for a server that answers /health (probed `attempts` times with backoff); connection
    failures inside the block become one CwtopsError naming the tracking URI."""
    from mlflow import MlflowClient

    uri = tracking_uri(params.mlflow)
    with bounded_client_retries():
        require_reachable(uri, attempts)
        try:
            yield MlflowClient(tracking_uri=uri, registry_uri=uri)
        except Exception as error:
            if not isinstance(error, CwtopsError) and is_connection_error(error):
                raise unreachable(uri, type(error).__name__) from error
            raise


def _not_found(error: Exception) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _get_version(client: MlflowClient, name: str, version: int) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if not _not_found(error):
            raise
        known = ", ".join(str(v) for v in sorted(int(m.version) for m in search_versions(client, name))) or "none"
        raise CwtopsError(f"'{name}' has no version {version} (versions: {known}); see `cwtops models`") from None


def search_versions(client: MlflowClient, name: str, run_id: str | None = None) -> list[ModelVersion]:
    query = f"name = '{name}'" + (f" and run_id = '{run_id}'" if run_id else "")
    return list(client.search_model_versions(query))


# ---------------------------------------------------------------- pure helpers


def checked_parity(paths: ArtifactPaths) -> tuple[dict, str]:
    """The parity report and the ONNX sha256, only when parity passed for exactly this file."""
    if not paths.parity_report.exists():
        raise CwtopsError(f"{paths.parity_report}: no parity report; run the parity stage first (`dvc repro parity`)")
    if not paths.onnx.exists():
        raise CwtopsError(f"{paths.onnx}: no ONNX export; run the export stage first (`dvc repro export`)")
    report = json.loads(paths.parity_report.read_text())
    if report.get("passed") is not True:
        failed = [case.get("name", "?") for case in report.get("cases", []) if not case.get("passed")]
        raise CwtopsError(
            f"{paths.parity_report}: parity did not pass (failed cases: {', '.join(failed) or 'see report'}; "
            f"max abs error {report.get('max_abs_error')}); not registering. Fix the export and re-run parity."
        )
    sha = sha256_file(paths.onnx)
    if report.get("onnx_sha256") != sha:
        raise CwtopsError(
            f"{paths.onnx} (sha256 {sha[:12]}) is not the file parity checked ({str(report.get('onnx_sha256'))[:12]}); "
            "re-run the parity stage (`dvc repro parity`)"
        )
    return report, sha


def version_tags(
    lineage: dict[str, str], run_id: str, onnx_sha256: str, reference_sha256: str, metrics: dict, parity: dict
) -> dict[str, str]:
    """Everything a served version is traced and checked by."""
    tags = {**lineage, "run_id": run_id, "onnx_sha256": onnx_sha256,
            "reference_artifact": REFERENCE_ARTIFACT, "reference_sha256": reference_sha256}
    tags |= {f"test_{k}": f"{v:.6f}" for k, v in metrics.items() if isinstance(v, float)}
    tags |= {f"parity_{k}": f"{parity[k]:.3e}" for k in ("max_abs_error", "max_rel_error") if k in parity}
    tags |= {"parity_argmax_agreement": f"{parity.get('argmax_agreement', float('nan')):.6f}", "parity_passed": "true"}
    if "argmax_ties" in parity:  # reports written before ties were counted have none
        tags["parity_argmax_ties"] = str(parity["argmax_ties"])
    return tags


def version_description(metrics: dict, parity: dict, tags: dict[str, str]) -> str:
    """Markdown shown on the version page: metrics table, parity, lineage."""
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float))
    count = f" ({metrics['n_test']} test signals)" if "n_test" in metrics else ""
    return (
        f"ONNX export, parity-checked against PyTorch{count}.\n\n"
        f"| test metric | value |\n|---|---|\n{rows}\n\n"
        f"| parity | value |\n|---|---|\n| max abs error | {parity.get('max_abs_error', float('nan')):.2e} |\n"
        f"| max rel error | {parity.get('max_rel_error', float('nan')):.2e} |\n"
        f"| argmax agreement | {parity.get('argmax_agreement', float('nan')):.4f} |\n"
        + (f"| classes that differ by a tie within tolerance | {parity['argmax_ties']} |\n" if "argmax_ties" in parity else "")
        + "\n"
        f"Lineage: run `{tags['run_id']}`, data `{tags['data_dvc_md5']}`, weights `{tags['weights_dvc_md5']}`, "
        f"commit `{tags['git_commit']}`, ONNX sha256 `{tags['onnx_sha256']}`."
    )


# ---------------------------------------------------------------- register


def tracked_run(client: MlflowClient, run_id: str, lineage: dict[str, str]) -> str:
    """The experiment of the run in track/run.json, which must exist here and describe these same inputs."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if not _not_found(error):
            raise
        raise CwtopsError(
            f"run {run_id} (artifacts/track/run.json) is not on this tracking server; re-run the track stage"
        ) from None
    changed = [key for key in LINEAGE_CHECKED if key in run.data.tags and run.data.tags[key] != lineage[key]]
    if changed:
        raise CwtopsError(f"{', '.join(changed)} changed since run {run_id} was tracked; re-run the pipeline (`dvc repro`)")
    return run.info.experiment_id


def _log_version(params: Params, run_id: str, experiment_id: str, tags: dict[str, str], uri: str) -> int:
    """`mlflow.onnx.log_model` into the tracked run, registering a new version with its tags."""
    import onnx
    from mlflow.models import infer_signature

    import mlflow

    paths = artifact_paths(params.base)
    model = onnx.load(str(paths.onnx))
    if hashlib.sha256(model.SerializeToString()).hexdigest() != tags["onnx_sha256"]:
        raise CwtopsError(f"{paths.onnx}: re-serialising changes its bytes; re-export it with onnx.save (`dvc repro export`)")
    reference = np.load(paths.reference)
    inputs, outputs = {"signal": reference["inputs"]}, {"logits": reference["outputs"]}
    mlflow.set_tracking_uri(uri)  # log_model resolves the tracking and registry URIs globally
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)  # else the logged model lands in experiment 0
    info = mlflow.onnx.log_model(
        model, name=MODEL_NAME_IN_RUN, registered_model_name=params.base.model_name,
        save_as_external_data=False, signature=infer_signature(inputs, outputs),
        input_example={"signal": reference["inputs"][:1]},
        extra_files=[str(path) for path in (paths.reference, paths.drift_reference) if path.exists()],
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # skips a subprocess that infers them
        metadata={prop.key: prop.value for prop in model.metadata_props}, tags=tags, run_id=run_id,
    )
    return int(info.registered_model_version)


def _register_once(client: MlflowClient, params: Params, run_id: str, parity: dict, sha: str) -> RegisterResult:
    from cwtops.registry.lineage import lineage

    paths, name = artifact_paths(params.base), params.base.model_name
    current = lineage(params.base)
    experiment_id = tracked_run(client, run_id, current)
    metrics = json.loads(paths.metrics.read_text())
    for existing in search_versions(client, name, run_id):
        if existing.tags.get("onnx_sha256") == sha:
            if not existing.description:  # an earlier attempt stopped before its description
                client.update_model_version(name, existing.version, version_description(metrics, parity, existing.tags))
            return RegisterResult(int(existing.version), run_id, sha, created=False)
    if not paths.reference.exists():
        raise CwtopsError(f"{paths.reference}: no parity reference; run the parity stage first")
    tags = version_tags(current, run_id, sha, sha256_file(paths.reference), metrics, parity)
    version = _log_version(params, run_id, experiment_id, tags, client.tracking_uri)
    client.update_model_version(name, str(version), description=version_description(metrics, parity, tags))
    return RegisterResult(version, run_id, sha, created=True)


def register(params: Params, attempts: int = 3) -> RegisterResult:
    """Register the parity-checked ONNX export as a new version of `base.model_name`.

    Reads only the files on disk (never retrains); idempotent per tracked run and ONNX file;
    connection failures are tried `attempts` times with backoff, then reported with the tracking
    URI (a Prefect task passes 1: its own retries are the policy there).
    """
    from cwtops.registry.lineage import load_run

    paths = artifact_paths(params.base)
    parity, sha = checked_parity(paths)
    run_id = load_run(params.base)["run_id"]
    with registry_client(params, attempts) as client:
        return with_retries(lambda: _register_once(client, params, run_id, parity, sha), client.tracking_uri, attempts)


# ---------------------------------------------------------------- promote, list, resolve, fetch, tag


def promote(params: Params, version: int, alias: str = ALIAS) -> None:
    """Set the alias `production` (or `alias`) on `version`, exactly as the MLflow UI does."""
    with registry_client(params) as client:
        _get_version(client, params.base.model_name, version)  # a clear error when it does not exist
        client.set_registered_model_alias(params.base.model_name, alias, str(version))


def remove_alias(params: Params, alias: str) -> int | None:
    """Delete `alias` from the model (as the UI's alias editor does); the version it was on, or None."""
    current = alias_version(params, alias)
    if current is not None:
        with registry_client(params) as client:
            client.delete_registered_model_alias(params.base.model_name, alias)
    return current


def production_version(params: Params) -> int | None:
    """The version carrying `production`, or None when no version does."""
    return alias_version(params, ALIAS)


def alias_version(params: Params, alias: str) -> int | None:
    """The version carrying `alias`, or None when no version does."""
    from mlflow.exceptions import MlflowException

    with registry_client(params) as client:
        try:
            return int(client.get_model_version_by_alias(params.base.model_name, alias).version)
        except MlflowException as error:
            if _not_found(error) or getattr(error, "error_code", "") == "INVALID_PARAMETER_VALUE":
                return None  # no such model, or no such alias
            raise


def list_versions(params: Params) -> list[dict]:
    """Versions newest first: key metric (`rollout.metric` on the test split), aliases, deployment status."""
    from mlflow.exceptions import MlflowException

    name, metric = params.base.model_name, f"test_{params.rollout.metric}"
    with registry_client(params) as client:
        try:
            aliases = client.get_registered_model(name).aliases  # {alias: version}
        except MlflowException as error:
            if _not_found(error):
                return []
            raise
        versions = search_versions(client, name)
    return [_version_row(v, metric, aliases) for v in sorted(versions, key=lambda v: int(v.version), reverse=True)]


def _version_row(version: ModelVersion, metric: str, aliases: dict[str, str]) -> dict:
    value = version.tags.get(metric)
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
    return {
        "version": int(version.version),
        "metric": float(value) if value else None,
        "aliases": sorted(alias for alias, target in aliases.items() if str(target) == str(version.version)),
        "deployment_status": version.tags.get(DEPLOYMENT_STATUS_TAG, ""),
        "challenger_status": version.tags.get("challenger_status", ""),
        "created": f"{created:%Y-%m-%d %H:%M} UTC",
        "run_id": version.run_id,
    }


def resolve_version(params: Params, version: int | None) -> int:
    """`version` when it exists; None: the `production` version, else the newest; an error when none."""
    name = params.base.model_name
    if version is not None:
        with registry_client(params) as client:
            return int(_get_version(client, name, version).version)
    production = production_version(params)
    if production is not None:
        return production
    versions = list_versions(params)
    if not versions:
        raise CwtopsError(
            f"no registered versions of '{name}' at {tracking_uri(params.mlflow)}; run the pipeline, then `cwtops register`"
        )
    return int(versions[0]["version"])


def download_version(params: Params, version: int, dest: Path) -> VersionFiles:
    """Fetch a version's model.onnx and parity reference into `dest`, both checked against the
    sha256 recorded at registration."""
    import mlflow

    name = params.base.model_name
    with registry_client(params) as client:
        entry = _get_version(client, name, version)
        location = client.get_model_version_download_uri(name, str(version))
        model_dir = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest), tracking_uri=client.tracking_uri)
        )
        reference = _reference_file(client, entry, model_dir, dest)
    onnx_path = model_dir / "model.onnx"
    if not onnx_path.exists():
        raise CwtopsError(f"version {version} of '{name}' has no model.onnx in its artifacts ({location})")
    _verify(onnx_path, entry.tags.get("onnx_sha256"), f"version {version} model.onnx")
    if "reference_sha256" in entry.tags:
        _verify(reference, entry.tags["reference_sha256"], f"version {version} reference")
    return VersionFiles(int(entry.version), onnx_path, reference, entry.run_id, dict(entry.tags))


def _reference_file(client: MlflowClient, entry: ModelVersion, model_dir: Path, dest: Path) -> Path:
    """The reference from the model folder; versions registered before it travelled there keep it in the run."""
    relative = entry.tags.get("reference_artifact", REFERENCE_ARTIFACT)
    path = model_dir / relative
    if path.exists():
        return path
    try:
        return Path(client.download_artifacts(entry.run_id, relative, str(dest)))
    except Exception as error:
        raise CwtopsError(f"version {entry.version}: no parity reference at '{relative}' ({error})") from None


def _verify(path: Path, expected: str | None, what: str) -> None:
    actual = sha256_file(path)
    if expected != actual:
        raise CwtopsError(f"{what}: downloaded sha256 {actual[:12]}, registry tag says {str(expected)[:12]}; refusing it")


def set_version_tags(params: Params, version: int, tags: dict[str, str]) -> None:
    """Set tags on a version (the rollout records deployment status, time and reason here)."""
    with registry_client(params) as client:
        for key, value in tags.items():
            client.set_model_version_tag(params.base.model_name, str(version), key, str(value))


def version_tags_of(params: Params, version: int) -> dict[str, str]:
    """The tags on a version (the rollout's, shadow scoring's, drift's and lineage's)."""
    with registry_client(params) as client:
        return dict(_get_version(client, params.base.model_name, version).tags)


def log_version_metrics(params: Params, version: int, metrics: dict[str, float], step: int = 0,
                        tags: dict[str, str] | None = None) -> str:
    """Metrics about a served version (shadow agreement, live accuracy) on the run that produced it,
    where its test metrics are, and the latest values as tags on the version itself. The run's id."""
    import time

    name = params.base.model_name
    with registry_client(params) as client:
        entry = _get_version(client, name, version)
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            client.log_metric(entry.run_id, key, float(value), timestamp=stamp, step=int(step))
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, str(version), key, str(value))
        return entry.run_id


def download_version_file(params: Params, version: int, relative: str, dest: Path) -> Path:
    """One file of a version's model folder (e.g. DRIFT_REFERENCE_ARTIFACT) into `dest`."""
    import mlflow

    name = params.base.model_name
    with registry_client(params) as client:
        _get_version(client, name, version)
        location = client.get_model_version_download_uri(name, str(version))
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/{relative}", dst_path=str(dest),
                                                            tracking_uri=client.tracking_uri))
        except Exception as error:
            if is_connection_error(error):
                raise
            raise CwtopsError(f"version {version} of '{name}' has no {relative} ({type(error).__name__}); "
                              "versions registered before it was recorded have none: retrain and register a new one") from None
