"""The deployments, written once, in prefect.yaml: `prefect deploy --all` sends them to a work pool
for workers to run, and `cwtops serve` reads the same file and serves them in-process. Names,
entry points, descriptions, parameters, schedules, event triggers and concurrency limits come from there alone."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cwtops.core.errors import CwtopsError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

PREFECT_FILE = Path(__file__).resolve().parent.parent / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # "flows/pipeline.py:train_flow"
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    concurrency_limit: int | None = None
    triggers: tuple[dict[str, Any], ...] = ()


def load_specs(path: Path = PREFECT_FILE) -> list[DeploymentSpec]:
    """The `deployments:` of a prefect.yaml, checked enough to fail here rather than in Prefect."""
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    except (OSError, yaml.YAMLError) as error:
        raise CwtopsError(f"{path}: cannot read the deployments ({error}); restore it from git") from None
    specs = []
    for entry in entries:
        try:
            specs.append(DeploymentSpec(
                name=entry["name"], entrypoint=entry["entrypoint"], description=entry.get("description", ""),
                parameters=dict(entry.get("parameters") or {}), schedules=tuple(entry.get("schedules") or ()),
                concurrency_limit=entry.get("concurrency_limit"), triggers=tuple(entry.get("triggers") or ())))
        except (KeyError, TypeError) as error:
            raise CwtopsError(f"{path}: deployment {entry!r} lacks {error}; each needs a name and an entrypoint") from None
    if not specs:
        raise CwtopsError(f"{path}: no deployments listed under `deployments:`")
    return specs


def schedule(entry: dict[str, Any], where: str) -> Schedule:
    """A prefect.yaml schedule (cron with timezone, or interval seconds) as Prefect's object."""
    from prefect.schedules import Cron, Interval

    if "cron" in entry:
        return Cron(entry["cron"], timezone=entry.get("timezone"))
    if "interval" in entry:
        return Interval(entry["interval"])
    raise CwtopsError(f"{where}: schedule {entry!r} is neither a cron nor an interval; cwtops serve runs those two kinds")


def trigger(entry: dict[str, Any], where: str) -> Any:  # noqa: ANN401 - a prefect DeploymentEventTrigger
    """A prefect.yaml event trigger as Prefect's object (the kind `prefect deploy` reads there too)."""
    from prefect.events import DeploymentEventTrigger
    from pydantic import ValidationError

    if entry.get("type", "event") != "event":
        raise CwtopsError(f"{where}: trigger {entry!r} is not an event trigger; cwtops serve runs event triggers")
    try:
        return DeploymentEventTrigger(**{key: value for key, value in entry.items() if key != "type"})
    except ValidationError as error:
        raise CwtopsError(f"{where}: trigger {entry!r} is not valid: {error}") from None


def flow_of(entrypoint: str, where: str) -> Any:  # noqa: ANN401 - a prefect Flow
    """`flows/pipeline.py:train_flow` -> the flow object (imported as a module of this checkout)."""
    file, _, name = entrypoint.partition(":")
    module = file.removesuffix(".py").replace("/", ".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise CwtopsError(f"{where}: entrypoint {entrypoint} does not name a flow of this checkout ({error})") from None


def runner_deployments(params_file: str, path: Path = PREFECT_FILE) -> list[RunnerDeployment]:
    """What `cwtops serve` runs: every deployment of prefect.yaml, with `params_file` set to this project's."""
    deployments = []
    for spec in load_specs(path):
        where = f"{path} deployment {spec.name}"
        deployments.append(flow_of(spec.entrypoint, where).to_deployment(
            name=spec.name, description=spec.description, parameters={**spec.parameters, "params_file": params_file},
            schedules=[schedule(entry, where) for entry in spec.schedules], concurrency_limit=spec.concurrency_limit,
            triggers=[trigger(entry, where) for entry in spec.triggers]))
    return deployments
