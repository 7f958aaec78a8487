"""The MLflow model registry: register parity-checked ONNX versions, promote, list, fetch, tag.

The alias `production` on a version of `base.model_name` is the single source of truth for what
Triton should serve. Every version carries lineage tags and the parity reference, so the served
model can be checked against the outputs recorded when it was exported.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import Params
from tasks.errors import CwtopsError
from tasks.io import sha256_file
from tasks.paths import artifact_paths
from tasks.tracking import require_reachable, tracking_uri

ALIAS = "production"
REFERENCE_ARTIFACT = "reference/reference.npz"


@dataclass(frozen=True)
class RegisterResult:
    version: int
    run_id: str
    onnx_sha256: str
    created: bool


@dataclass(frozen=True)
class VersionFiles:
    version: int
    onnx: Path
    reference: Path
    run_id: str
    tags: dict


def _client(params: Params, attempts: int = 3, backoff: float = 2.0):  # noqa: ANN202
    """A client for a reachable server: retries with backoff, then a clear error naming the URI."""
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    for attempt in range(1, attempts + 1):
        try:
            require_reachable(uri)
            break
        except CwtopsError:
            if attempt == attempts:
                raise
            time.sleep(backoff * attempt)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _checked_parity(params: Params) -> tuple[dict, str]:
    paths = artifact_paths(params)
    if not paths.parity_report.exists():
        raise CwtopsError(f"{paths.parity_report}: no parity report; run the parity stage first")
    report = json.loads(paths.parity_report.read_text())
    sha = sha256_file(paths.onnx)
    if not report.get("passed"):
        raise CwtopsError(f"{paths.parity_report}: parity did not pass ({report.get('failure')}); not registering")
    if report.get("onnx_sha256") != sha:
        raise CwtopsError(f"{paths.onnx} changed after parity checked it; re-run the parity stage")
    return report, sha


def _existing(client, name: str, run_id: str, sha: str) -> int | None:  # noqa: ANN001
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get("onnx_sha256") == sha:
            return int(version.version)
    return None


def _description(metrics: dict, parity: dict, lineage: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float))
    return (
        f"| test metric | value |\n|---|---|\n{rows}\n\n"
        f"Parity (PyTorch vs ONNX Runtime): max abs error {parity['max_abs_error']:.2e}, "
        f"argmax agreement {parity['argmax_agreement']:.4f}.\n\n"
        f"Data {lineage['data_dvc_md5']}, weights {lineage['weights_dvc_md5']}, commit {lineage['git_commit']}."
    )


def register(params: Params) -> RegisterResult:
    """Register the parity-checked ONNX export as a new version (idempotent per run and file)."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from tasks.track import lineage, load_run

    parity, sha = _checked_parity(params)
    paths, name = artifact_paths(params), params.base.model_name
    run_id = load_run(params)["run_id"]
    client = _client(params)
    existing = _existing(client, name, run_id, sha)
    if existing is not None:
        return RegisterResult(existing, run_id, sha, created=False)
    reference = np.load(paths.reference)
    metrics = json.loads(paths.metrics.read_text())
    mlflow.set_tracking_uri(tracking_uri(params))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(paths.reference), "reference")
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(paths.onnx)),
            name="model",
            registered_model_name=name,
            save_as_external_data=False,
            signature=infer_signature(reference["inputs"], reference["outputs"]),
            input_example=reference["inputs"][:1],
        )
    version = int(info.registered_model_version)
    tags = {**lineage(params), "run_id": run_id, "onnx_sha256": sha, "reference_artifact": REFERENCE_ARTIFACT,
            **{f"test_{k}": f"{v:.6f}" for k, v in metrics.items() if isinstance(v, float)},
            **{f"parity_{k}": f"{parity[k]:.3e}" for k in ("max_abs_error", "max_rel_error", "argmax_agreement")}}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.update_model_version(name, str(version), description=_description(metrics, parity, tags))
    return RegisterResult(version, run_id, sha, created=True)


def promote(params: Params, version: int) -> None:
    """Set the `production` alias on `version`, exactly as the MLflow UI does."""
    client = _client(params)
    client.get_model_version(params.base.model_name, str(version))  # a clear error if it does not exist
    client.set_registered_model_alias(params.base.model_name, ALIAS, str(version))


def production_version(params: Params) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(_client(params).get_model_version_by_alias(params.base.model_name, ALIAS).version)
    except MlflowException:
        return None


def list_versions(params: Params) -> list[dict]:
    """Versions newest first: key metric, aliases, deployment status."""
    from mlflow.exceptions import MlflowException

    client, metric = _client(params), f"test_{params.rollout.metric}"
    try:
        versions = client.search_model_versions(f"name = '{params.base.model_name}'")
        aliases = client.get_registered_model(params.base.model_name).aliases  # search results omit them
    except MlflowException:
        return []
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        value = version.tags.get(metric)
        rows.append({
            "version": int(version.version),
            "metric": float(value) if value else None,
            "aliases": sorted(alias for alias, target in aliases.items() if str(target) == str(version.version)),
            "deployment_status": version.tags.get("deployment_status", ""),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(version.creation_timestamp / 1000)),
            "run_id": version.run_id,
        })
    return rows


def resolve_version(params: Params, version: int | None) -> int:
    """`version`, else the production alias, else the newest version."""
    if version is not None:
        return version
    production = production_version(params)
    if production is not None:
        return production
    versions = list_versions(params)
    if not versions:
        raise CwtopsError(f"no registered versions of '{params.base.model_name}'; run the pipeline and `cwtops register`")
    return versions[0]["version"]


def download_version(params: Params, version: int, dest: Path) -> VersionFiles:
    """Fetch a version's ONNX and reference; the ONNX must match the hash recorded at registration."""
    import mlflow

    client, name = _client(params), params.base.model_name
    entry = client.get_model_version(name, str(version))
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest / "model"), tracking_uri=tracking_uri(params)))
    onnx_path = model_dir / "model.onnx"
    if not onnx_path.exists():
        raise CwtopsError(f"version {version} of '{name}' has no model.onnx in its artifacts")
    expected = entry.tags.get("onnx_sha256")
    actual = sha256_file(onnx_path)
    if expected != actual:
        raise CwtopsError(f"version {version}: downloaded model.onnx has sha256 {actual[:12]}, registry says {str(expected)[:12]}; refusing it")
    reference = Path(client.download_artifacts(entry.run_id, entry.tags.get("reference_artifact", REFERENCE_ARTIFACT), str(dest)))
    return VersionFiles(version, onnx_path, reference, entry.run_id, dict(entry.tags))


def set_version_tags(params: Params, version: int, tags: dict[str, str]) -> None:
    client = _client(params)
    for key, value in tags.items():
        client.set_model_version_tag(params.base.model_name, str(version), key, value)
