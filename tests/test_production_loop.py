"""The production loop against the real servers: a challenger beside production, the inference log,
shadow scoring, drift that starts retraining through a Prefect event, feedback."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from tests.conftest import BIN, new_version, run, webhook_receiver

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _remove_loop_params(built_project: Path):  # noqa: ANN202
    """The params files the tests write into the project go when each test ends."""
    yield
    for path in built_project.glob("params-loop-*.yaml"):
        path.unlink()


def logging_params(project: Path, tmp_path: Path, **monitoring: object):  # noqa: ANN201 - Params
    """The project's params with the inference log on (every request) in a folder of this test's own.
    The file sits in the project (flows run DVC where their params file is); the test removes it."""
    from cwtops.core.config import load_params

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["monitoring"].update({"inference_log": str(tmp_path / "inference_log"), "sample_rate": 1.0, "flush_seconds": 0.5,
                              **monitoring})
    path = project / f"params-loop-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path), path


def republish(params, version: int) -> None:  # noqa: ANN001
    """Publish a served version again under `params` (the same bytes: only its config, and so its logging, changes)."""
    import tempfile

    from cwtops.registry.versions import download_version
    from cwtops.serving.publish import publish_version

    with tempfile.TemporaryDirectory() as scratch:
        files = download_version(params, version, Path(scratch))
        publish_version(files.onnx, version, params, reference=files.reference)


def serving(params) -> int:  # noqa: ANN001
    """Converge (a test may run first, before anything is registered or served) and return production's version."""
    from cwtops.registry.versions import production_version, promote
    from cwtops.serving.rollout import reconcile

    if production_version(params) is None:
        promote(params, new_version(params))
    outcome = reconcile(params)
    assert outcome.served is not None, outcome
    return outcome.served


def held_out(project: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split's signals and labels."""
    from cwtops.core.config import load_params
    from cwtops.core.paths import artifact_paths
    from cwtops.data.signals import load_signals, read_manifest

    params = load_params(project / "params.yaml")
    manifest = read_manifest(artifact_paths(params.base).split_manifest)
    rows = manifest[manifest.split == "test"]
    return load_signals(rows, Path(params.base.raw_dir)).astype(np.float32), rows.label.to_numpy()


def fresh_signals(folder: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Signals the model never saw, from the source of its training data (the sample data, another seed)."""
    from cwtops.data.signals import write_sample_dataset

    counts = write_sample_dataset(folder, seed=1234, counts=dict.fromkeys(("noise", "burst", "chirp", "am", "fm"), per_class))
    signals, labels = [], []
    for name in sorted(counts):
        for shard in sorted((folder / name).glob("*.npy")):
            rows = np.load(shard)
            signals.append(rows)
            labels += [name] * len(rows)
    return np.concatenate(signals).astype(np.float32), np.array(labels)


def with_class0_shift(model, shift: float):  # noqa: ANN001, ANN201 - an onnx.ModelProto
    """A copy of the export with `shift` added to class 0's logit bias in every fc2."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    changed = 0
    for initializer in model.graph.initializer:
        if initializer.name.endswith("fc2.bias"):
            bias = numpy_helper.to_array(initializer).copy()
            bias[0] += shift
            initializer.CopyFrom(numpy_helper.from_array(bias, initializer.name))
            changed += 1
    assert changed, "no fc2.bias initializer in the export"
    return model


def shift_that_changes_some(params, signals: np.ndarray) -> float:  # noqa: ANN001
    """The smallest shift of class 0's bias (doubling from 0.25) that changes the export's
    prediction on some of `signals` but not on all: how far that takes depends on the trained
    model's margins, which no fixed shift can know."""
    import onnx
    import onnxruntime as ort

    from cwtops.core.paths import artifact_paths

    model = onnx.load(str(artifact_paths(params.base).onnx))

    def predictions(proto) -> np.ndarray:  # noqa: ANN001
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"signal": signals[:, None, :]})[0].argmax(1)

    production, shift = predictions(model), 0.25
    while shift <= 1024:
        changed = float((predictions(with_class0_shift(model, shift)) != production).mean())
        if 0.0 < changed < 1.0:
            return shift
        shift *= 2
    raise AssertionError("no shift of class 0's bias changes some predictions and not all")


def register_shifted_version(params, shift: float = 3.0) -> int:  # noqa: ANN001
    """A version that really differs: the export with `shift` added to class 0's logit bias in
    every fc2, registered with its own parity reference (as a retrained model would be)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    import mlflow
    from cwtops.core.artifacts import sha256_file
    from cwtops.core.paths import artifact_paths
    from cwtops.registry.lineage import load_run
    from cwtops.registry.server import tracking_uri
    from cwtops.registry.versions import REFERENCE_ARTIFACT
    from tasks.track import run as track_run

    paths = artifact_paths(params.base)
    model = with_class0_shift(onnx.load(str(paths.onnx)), shift)
    track_run(params.mlflow, params.base)
    run_id = load_run(params.base)["run_id"]
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path, reference = Path(scratch) / "model.onnx", Path(scratch) / "reference.npz"
        onnx.save(model, str(onnx_path))
        inputs = np.load(paths.reference)["inputs"]
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        np.savez(reference, inputs=inputs, outputs=session.run(None, {"signal": inputs})[0])
        tags = {"run_id": run_id, "onnx_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(),
                "reference_artifact": REFERENCE_ARTIFACT, "reference_sha256": sha256_file(reference), "parity_passed": "true"}
        mlflow.set_tracking_uri(tracking_uri(params.mlflow))
        mlflow.set_registry_uri(tracking_uri(params.mlflow))
        info = mlflow.onnx.log_model(model, name="model", registered_model_name=params.base.model_name, save_as_external_data=False,
                                     extra_files=[str(reference)], tags=tags, run_id=run_id,
                                     pip_requirements=mlflow.onnx.get_default_pip_requirements())
    return int(info.registered_model_version)


def wait_for(condition, timeout: float, what: str) -> float:  # noqa: ANN001
    started, last = time.monotonic(), None
    while time.monotonic() - started < timeout:
        try:
            if condition():
                return time.monotonic() - started
        except Exception as error:  # noqa: BLE001 - a server in the middle of a change
            last = error
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s" + (f" (last error: {type(last).__name__}: {last})" if last else ""))


# ---------------------------------------------------------------- challenger


def test_challenger_alias_set_and_removed_reaches_triton_within_15_seconds(harness, in_project: Path, params, triton_server: str,
                                                                             mlflow_server: str, services_env: dict, tmp_path: Path) -> None:
    from cwtops.registry.versions import promote
    from cwtops.serving.client import infer
    from cwtops.serving.publish import challenger_model_name, served_versions
    from cwtops.serving.rollout import reconcile
    from mlflow import MlflowClient

    name, challenger_name = params.base.model_name, challenger_model_name(params)
    production = new_version(params)
    promote(params, production)
    reconcile(params)
    challenger = register_shifted_version(params)  # newer than production: Triton's default would pick it
    assert challenger > production
    client = MlflowClient(tracking_uri=mlflow_server)
    with webhook_receiver(params, in_project / "params.yaml", f"secret-{time.time()}"):
        started = time.monotonic()
        client.set_registered_model_alias(name, "challenger", str(challenger))  # what the UI's alias editor sends
        set_seconds = wait_for(lambda: served_versions(triton_server, challenger_name) == [challenger], 15, "challenger served")
        assert served_versions(triton_server, name) == [production]  # production serves alone under its name
        signals = np.load(in_project / "artifacts/parity/reference.npz")["inputs"][:8]
        unversioned = infer(triton_server, name, signals)
        np.testing.assert_array_equal(unversioned, infer(triton_server, name, signals, version=production))
        assert not np.allclose(unversioned, infer(triton_server, challenger_name, signals, version=challenger))

        np.save(tmp_path / "signals.npy", signals[:2, 0])
        for version in (production, challenger):
            shown = run([str(BIN / "cwtops"), "predict", str(tmp_path / "signals.npy"), "--version", str(version)], in_project, services_env)
            assert shown.stdout.count("signal ") == 2, shown.stdout
        listed = run([str(BIN / "cwtops"), "models"], in_project, services_env).stdout
        rows = {int(line.split()[0]): line for line in listed.splitlines()[1:]}
        assert "challenger" in rows[challenger] and "serving" in rows[challenger]
        assert "production" in rows[production]

        removed = time.monotonic()
        client.delete_registered_model_alias(name, "challenger")
        remove_seconds = wait_for(lambda: served_versions(triton_server, challenger_name) == [], 15, "challenger retired")
        assert not (in_project / params.triton.model_repository / challenger_name).exists()
        assert served_versions(triton_server, name) == [production]
    print(f"challenger set -> served in {set_seconds:.1f} s, removed -> retired in {remove_seconds:.1f} s "
          f"({time.monotonic() - started:.1f} s in all, {time.monotonic() - removed:.1f} s since removal)")
    assert "retired" in run([str(BIN / "cwtops"), "models"], in_project, services_env).stdout


# ---------------------------------------------------------------- inference log


def test_a_failing_inference_log_never_fails_a_request(in_project: Path, params, triton_server: str, tmp_path: Path) -> None:
    from cwtops.monitoring.logs import wait_for_rows
    from cwtops.serving.client import infer

    version = serving(params)
    signals = np.load(in_project / "artifacts/parity/reference.npz")["inputs"][:16]
    expected = infer(triton_server, params.base.model_name, signals)
    (tmp_path / "blocked").write_text("")  # the log folder cannot be made: a file is in the way
    broken, _ = logging_params(in_project, tmp_path, inference_log=str(tmp_path / "blocked" / "log"))
    try:
        republish(broken, version)
        for _ in range(20):
            np.testing.assert_allclose(infer(triton_server, params.base.model_name, signals, request_id="r"), expected, atol=1e-5)
        working, _ = logging_params(in_project, tmp_path)
        republish(working, version)
        for i in range(5):
            infer(triton_server, params.base.model_name, signals[:4], request_id=f"ok-{i}")
        logged = wait_for_rows(working.monitoring.inference_log, params.base.model_name, 20, timeout=30)
        assert len(logged) == 20 and set(logged.frame.version) == {version}
        assert sorted(set(logged.frame.request_id)) == [f"ok-{i}" for i in range(5)]
        np.testing.assert_allclose(logged.logits, np.tile(expected[:4], (5, 1)), atol=1e-5)
    finally:
        republish(params, version)  # logging off again for the other tests


# ---------------------------------------------------------------- shadow


def test_shadow_agreement_equals_an_offline_computation(in_project: Path, params, triton_server: str, services_env: dict,
                                                        tmp_path: Path) -> None:
    import tempfile

    import onnxruntime as ort

    from cwtops.monitoring.logs import read_log, wait_for_rows
    from cwtops.monitoring.shadow import compare, shadow_pass
    from cwtops.registry.versions import CHALLENGER_ALIAS, download_version, promote, remove_alias, version_tags_of
    from cwtops.serving.client import infer
    from cwtops.serving.rollout import reconcile

    production = new_version(params)
    promote(params, production)
    signals, _ = held_out(in_project)
    challenger = register_shifted_version(params, shift=shift_that_changes_some(params, signals))
    promote(params, challenger, CHALLENGER_ALIAS)
    outcome = reconcile(params)
    assert outcome.served == production and outcome.challenger["served"] == challenger, outcome
    loop, _ = logging_params(in_project, tmp_path)
    republish(loop, production)
    try:
        for start in range(0, len(signals), 7):
            infer(triton_server, params.base.model_name, signals[start:start + 7], request_id=f"s{start}")
        wait_for_rows(loop.monitoring.inference_log, params.base.model_name, len(signals), timeout=30)
        time.sleep(loop.monitoring.flush_seconds + 2.5)  # past the pass's settle time
        result = shadow_pass(loop, triton_server)
    finally:
        republish(params, production)
    assert result.action == "scored" and result.signals == len(signals), result
    scored = read_log(loop.monitoring.inference_log, params.base.model_name, production)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = download_version(params, challenger, Path(scratch)).onnx
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        offline = session.run(None, {"signal": scored.signals[:, None, :]})[0]
    agree, delta = compare(scored.logits, offline)
    assert result.agreement == pytest.approx(float(agree.mean()), abs=1e-12)
    assert result.confidence_delta == pytest.approx(float(delta.mean()), abs=1e-5)
    assert 0.0 < result.agreement < 1.0  # the challenger really differs
    tags = version_tags_of(params, challenger)
    assert tags["shadow_signals"] == str(len(signals)) and float(tags["shadow_agreement"]) == pytest.approx(result.agreement, abs=1e-6)
    report = run([str(BIN / "cwtops"), "shadow", "report"], in_project, services_env).stdout
    assert any(line.split()[0] == str(challenger) for line in report.splitlines()[1:]), report
    assert shadow_pass(loop, triton_server).action == "no_traffic"  # each logged signal is scored once
    remove_alias(params, CHALLENGER_ALIAS)
    assert reconcile(params).challenger["action"] == "retired"


# ---------------------------------------------------------------- feedback


def test_feedback_gives_live_accuracy_per_version(in_project: Path, params, triton_server: str, services_env: dict,
                                                  tmp_path: Path) -> None:
    from cwtops.registry.versions import version_tags_of
    from cwtops.serving.client import class_names, infer

    version = serving(params)
    loop, loop_file = logging_params(in_project, tmp_path)
    republish(loop, version)
    try:
        signals, labels = held_out(in_project)
        logits = infer(triton_server, params.base.model_name, signals, request_id="fb", max_batch=len(signals))
    finally:
        republish(params, version)
    names = class_names(triton_server, params.base.model_name)
    expected = float((np.array(names)[logits.argmax(1)] == labels).mean())
    lines = ["request_id,row,label", *(f"fb,{row},{label}" for row, label in enumerate(labels)), "never-sent,0,x"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    shown = run([str(BIN / "cwtops"), "feedback", str(tmp_path / "labels.csv"), "--params", str(loop_file)], in_project, services_env)
    assert f"version {version}: live accuracy {expected:.4f} ({round(expected * len(labels))}/{len(labels)}" in shown.stdout, shown.stdout
    assert "1 of" in shown.stdout  # the label for a request never logged is reported, not guessed
    assert float(version_tags_of(params, version)["live_accuracy"]) == pytest.approx(expected)


# ---------------------------------------------------------------- drift -> event -> retraining


def _api(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def _deployment_ids(api: str) -> dict[str, str]:
    found = requests.post(f"{api}/deployments/filter", json={}, timeout=10)
    found.raise_for_status()
    return {d["name"]: d["id"] for d in found.json()}


def _run_deployment(api: str, deployment_id: str, timeout: float = 240) -> dict:
    created = requests.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={}, timeout=10)
    created.raise_for_status()
    run_id = created.json()["id"]
    final = {}

    def done() -> bool:
        final.update(requests.get(f"{api}/flow_runs/{run_id}", timeout=10).json())
        return final["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    wait_for(done, timeout, f"flow run {run_id}")
    assert final["state"]["type"] == "COMPLETED", final["state"]
    return final


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    found = requests.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}, timeout=10)
    found.raise_for_status()
    return found.json()


def _drift_events(api: str) -> list[dict]:
    found = requests.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["cwtops.drift.detected"]}}, "limit": 50}, timeout=10)
    found.raise_for_status()
    return found.json()["events"]


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_shift_is_detected_in_the_first_pass_and_its_event_starts_retraining(in_project: Path, params, mlflow_server: str,
                                                                               triton_server: str, services_env: dict,
                                                                               tmp_path: Path) -> None:
    from cwtops.serving.client import class_names, infer
    from tests.conftest import free_port

    version = serving(params)
    loop, loop_file = logging_params(in_project, tmp_path, min_signals=100)
    signals, labels = fresh_signals(tmp_path / "fresh", per_class=80)  # new draws from the training data's source
    rng = np.random.default_rng(0)
    shifted = (signals + rng.normal(0, 1.0, signals.shape) * signals.std(axis=1, keepdims=True)).astype(np.float32)
    names = np.array(class_names(triton_server, params.base.model_name))
    accuracy = float((names[infer(triton_server, params.base.model_name, signals).argmax(1)] == labels).mean())
    accuracy_shifted = float((names[infer(triton_server, params.base.model_name, shifted).argmax(1)] == labels).mean())
    assert accuracy - accuracy_shifted >= 0.10, (accuracy, accuracy_shifted)  # a shift that costs 10 points or more

    port = free_port()
    api = _api(port)
    env = {**services_env, "CWTOPS_PREFECT_PORT": str(port), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    log_path = tmp_path / "serve.log"
    republish(loop, version)
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([str(BIN / "cwtops"), "serve", "--no-webhook", "--params", str(loop_file)], cwd=in_project, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: {"nightly", "monitor", "reconcile"} <= set(_deployment_ids(api)), 180, "deployments served")
            ids = _deployment_ids(api)
            wait_for(lambda: not any(r["state"]["type"] in ("RUNNING", "PENDING", "SCHEDULED") and r["expected_start_time"]
                                     and _seconds(r["expected_start_time"]) < time.time()
                                     for r in _flow_runs(api, ids["monitor"])), 120, "start-up monitor pass")
            # the same source as training: the first pass judges it and finds no drift
            infer(triton_server, params.base.model_name, signals)
            time.sleep(loop.monitoring.flush_seconds + 3)
            _run_deployment(api, ids["monitor"])
            retrains_before = len(_flow_runs(api, ids["nightly"]))
            # the shift: the next pass detects it, and its event starts the retraining deployment
            infer(triton_server, params.base.model_name, shifted)
            time.sleep(loop.monitoring.flush_seconds + 3)
            _run_deployment(api, ids["monitor"])
            wait_for(lambda: _drift_events(api), 30, "the drift event stored")  # the server stores events in batches
            time.sleep(5)
            events = _drift_events(api)
            # one event: the shifted pass's (the first pass, on the training source, sent none)
            assert len(events) == 1 and events[0]["payload"]["worst_psi"] > loop.monitoring.drift_threshold, events
            assert events[0]["payload"]["version"] == version
            occurred = _seconds(events[0]["occurred"])
            started, seen = {}, {}

            def retraining_started() -> bool:
                runs = _flow_runs(api, ids["nightly"])
                seen["runs"] = [(r["name"], r["state"]["type"], r["start_time"]) for r in runs]
                after = [r for r in runs if r["start_time"] and _seconds(r["start_time"]) >= occurred - 1]
                if len(runs) > retrains_before and after:
                    first = min(after, key=lambda r: _seconds(r["start_time"]))
                    started.update(at=_seconds(first["start_time"]), id=first["id"])
                    return True
                return False

            try:
                wait_for(retraining_started, 60, "retraining flow run started")
            except AssertionError as error:
                raise AssertionError(f"{error}; nightly runs before: {retrains_before}, now: {seen}, event at {occurred}") from None
            latency = started["at"] - occurred
            print(f"drift event -> retraining flow run started: {latency:.1f} s; accuracy {accuracy:.3f} -> {accuracy_shifted:.3f}")
            assert latency <= 30, latency
            # let the retraining finish: a run stopped halfway would leave DVC's lock to the next test
            wait_for(lambda: requests.get(f"{api}/flow_runs/{started['id']}", timeout=10).json()["state"]["type"]
                     in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 600, "retraining flow run finished")
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(60)
            subprocess.run(["pkill", "-f", f"prefect server start.*--port {port}"], check=False)
            republish(params, version)
