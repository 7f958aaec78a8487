"""Fixtures for the MLflow tests: a real MLflow server (SQLite or PostgreSQL) and a fabricated
pipeline output tree (bench/fabricated.py) wired to it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.fabricated import (  # noqa: F401 - re-exported for the test modules
    CLASSES,
    DATA_MD5,
    EPOCHS,
    SIGNAL_LENGTH,
    WEIGHTS_MD5,
    TreeShape,
    fabricate_project,
    free_port,
    params_dict,
)
from tests.postgres import Cluster, throwaway_cluster


@dataclass(frozen=True)
class MlflowTestServer:
    uri: str
    port: int
    store: Path
    state: Path
    backend: str  # the store's URI: SQLite, or PostgreSQL in a throwaway cluster
    cluster: Cluster | None = None


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the session (127.0.0.1, a free port, password auth)."""
    try:
        context = throwaway_cluster()
        cluster = context.__enter__()
    except RuntimeError as error:
        pytest.fail(str(error))  # not a skip: the PostgreSQL checks are part of the suite
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PGPASSWORD", cluster.password)  # what libpq (psycopg2) reads; MLflow's server inherits it
            yield cluster
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def mlflow_test_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowTestServer]:
    """A real `mlflow server` on a free 127.0.0.1 port, artifacts in a tmp dir, its store SQLite or
    PostgreSQL: every test that uses it runs on both."""
    from cwtops.core.config import params_from_dict
    from cwtops.registry.server import start, stop

    port, store, state = free_port(), tmp_path_factory.mktemp("mlflow-store"), tmp_path_factory.mktemp("state")
    cluster = request.getfixturevalue("postgres_cluster") if request.param == "postgresql" else None
    backend = cluster.create_database(f"mlflow_{port}") if cluster else f"sqlite:///{store / 'mlflow.db'}"
    params = params_from_dict(params_dict(port, store, backend=backend))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CWTOPS_STATE_DIR", str(state))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        info = start(params.mlflow, wait=180)
        try:
            yield MlflowTestServer(info["uri"], port, store, state, backend, cluster)
        finally:
            stop(params.mlflow)


@dataclass(frozen=True)
class FabricatedProject:
    root: Path
    commit: str
    uri: str


@pytest.fixture(scope="module")
def fabricated_tree(tmp_path_factory: pytest.TempPathFactory, mlflow_test_server: MlflowTestServer) -> FabricatedProject:
    """One fabricated project per test module, wired to the session's server."""
    root = tmp_path_factory.mktemp("project")
    commit = fabricate_project(root, mlflow_test_server.port, mlflow_test_server.store, backend=mlflow_test_server.backend)
    return FabricatedProject(root, commit, mlflow_test_server.uri)


@pytest.fixture()
def in_fabricated(fabricated_tree: FabricatedProject, mlflow_test_server: MlflowTestServer, monkeypatch: pytest.MonkeyPatch) -> FabricatedProject:
    """Run from the fabricated project's root with MLFLOW_TRACKING_URI on the test server."""
    monkeypatch.chdir(fabricated_tree.root)
    monkeypatch.setenv("CWTOPS_STATE_DIR", str(mlflow_test_server.state))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_test_server.uri)
    monkeypatch.delenv("CWTOPS_MLFLOW_RUN_ID", raising=False)
    return fabricated_tree
