"""deploy/compose and deploy/k8s describe the same deployment as deploy/topology.py (the table the
local multi-node stack runs): the same processes with the same commands, replica counts, settings,
NATS users, probes, strict durability mode and a 3-node NATS with `sync_interval: always`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from deploy.stack import read_env_file
from deploy.topology import (
    BACKING,
    COMMON_ENV,
    DURABILITY_ENV,
    NATS_MONITOR_PORT,
    NATS_NODES,
    PROCESSES,
    SHARED_PROJECTIONS,
    Process,
    process,
)
from schemas.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GATEWAY = [p.name for p in PROCESSES]
SETTINGS_VARS = {f"ALEPHANT_{f.name.upper()}" for f in msgspec.structs.fields(Settings)}


# ---- compose ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())["services"]
    return services


def _compose_probe(service: dict[str, Any]) -> tuple[int, str] | None:
    """(port, path) of the URL the service's health check fetches."""
    check = service.get("healthcheck")
    if check is None:
        return None
    url = re.search(r"https?://[^'\" ]+", " ".join(check["test"]))
    assert url, check
    parts = urlsplit(url.group(0))
    return parts.port or 80, parts.path


def test_compose_runs_the_topology_and_its_engines(compose: dict[str, Any]) -> None:
    nats = [f"nats-{i}" for i in range(1, NATS_NODES + 1)]
    assert set(compose) == {*GATEWAY, *nats, "postgres", "redis", "lb"}
    for backing in BACKING:
        if backing.name != "nats":
            assert compose[backing.name].get("deploy", {}).get("replicas", 1) == backing.replicas


@pytest.mark.parametrize("proc", PROCESSES, ids=GATEWAY)
def test_compose_service_matches_the_topology(compose: dict[str, Any], proc: Process) -> None:
    service = compose[proc.name]
    assert service["command"] == list(proc.command)
    env = service["environment"]
    assert set(env) == COMMON_ENV | proc.env
    assert env["ALEPHANT_NATS_USER"] == proc.bus_role
    for var, value in DURABILITY_ENV.items():
        assert str(env[var]) == value, var
    if proc.replicas == 0:  # one-shot
        assert service["restart"] == "no" and "deploy" not in service
        return
    assert service["deploy"]["replicas"] == proc.replicas
    assert service["restart"] == "unless-stopped"
    assert _compose_probe(service) == (proc.port, proc.readiness)
    assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    if "ALEPHANT_REDIS_URL" in proc.env:
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_compose_nats_is_a_cluster_fsyncing_every_write(compose: dict[str, Any]) -> None:
    conf = (DEPLOY / "nats" / "nats-cluster.conf").read_text()
    jetstream = conf[conf.index("jetstream {"):]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", jetstream, re.M)
    routes = re.findall(r"^\s*nats-route://(\S+)\s*$", conf, re.M)
    assert routes == [f"nats-{i}:6222" for i in range(1, NATS_NODES + 1)]
    for i in range(1, NATS_NODES + 1):
        node = compose[f"nats-{i}"]
        assert node["command"] == ["--config", "/etc/nats/nats-cluster.conf"]
        assert node["environment"]["NATS_SERVER_NAME"] == f"nats-{i}"
    env = compose["dataplane"]["environment"]
    assert env["ALEPHANT_NATS_URL"].split(",") == [f"nats://nats-{i}:4222" for i in range(1, NATS_NODES + 1)]
    assert env["ALEPHANT_NATS_MONITOR_URLS"].split(",") == [
        f"http://nats-{i}:{NATS_MONITOR_PORT}" for i in range(1, NATS_NODES + 1)]


# ---- kubernetes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def configmap() -> dict[str, str]:
    return read_env_file(DEPLOY / "k8s" / "alephant.env")


def _workload(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("Deployment", "Job")
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, component
    return found[0]


def _probe(container: dict[str, Any], kind: str) -> tuple[int, str] | None:
    probe = container.get(kind)
    if probe is None:
        return None
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    port = probe["httpGet"]["port"]
    return ports.get(port, port), probe["httpGet"]["path"]


@pytest.mark.parametrize("proc", PROCESSES, ids=GATEWAY)
def test_k8s_workload_matches_the_topology(k8s: list[dict[str, Any]], configmap: dict[str, str],
                                           proc: Process) -> None:
    workload = _workload(k8s, proc.name)
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert container["args"] == list(proc.command)
    assert container["envFrom"] == [{"configMapRef": {"name": "alephant-config"}}]
    env = {e["name"]: e for e in container["env"]}
    assert set(configmap) | set(env) == COMMON_ENV | proc.env
    assert env["ALEPHANT_NATS_USER"]["value"] == proc.bus_role
    if proc.replicas == 0:
        assert workload["kind"] == "Job"
        return
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == proc.replicas
    assert _probe(container, "readinessProbe") == (proc.port, proc.readiness)
    assert _probe(container, "livenessProbe") == (proc.port, proc.liveness)


def test_k8s_secrets_referenced_exist(k8s: list[dict[str, Any]]) -> None:
    (secret,) = [d for d in k8s if d["kind"] == "Secret"]
    for proc in PROCESSES:
        (container,) = _workload(k8s, proc.name)["spec"]["template"]["spec"]["containers"]
        for e in container["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], e


def test_k8s_autoscaler_starts_at_the_topology_count(k8s: list[dict[str, Any]]) -> None:
    (hpa,) = [d for d in k8s if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == _workload(k8s, "dataplane")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] == next(p.replicas for p in PROCESSES if p.name == "dataplane")


def test_k8s_config_is_strict_with_every_nats_monitor(configmap: dict[str, str]) -> None:
    for var, value in DURABILITY_ENV.items():
        assert configmap[var] == value, var
    monitors = configmap["ALEPHANT_NATS_MONITOR_URLS"].split(",")
    assert len(set(monitors)) == NATS_NODES
    assert all(urlsplit(u).port == NATS_MONITOR_PORT for u in monitors)


def test_k8s_nats_values_are_a_cluster_fsyncing_every_write() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": NATS_NODES}
    assert values["config"]["jetstream"]["enabled"] is True
    assert values["config"]["jetstream"]["merge"]["sync_interval"] == "always"
    assert values["config"]["monitor"]["enabled"] is True


# ---- both, against the code ---------------------------------------------------------------------

def test_compose_and_k8s_agree_on_the_shared_settings(compose: dict[str, Any], configmap: dict[str, str]) -> None:
    """Same listeners, strictness and replica count; URLs differ by platform (service names)."""
    env = compose["dataplane"]["environment"]
    for var in sorted(COMMON_ENV - {"ALEPHANT_NATS_URL", "ALEPHANT_NATS_MONITOR_URLS", "ALEPHANT_LOG_LEVEL"}):
        assert str(env[var]) == configmap[var], var


def test_every_variable_is_a_setting() -> None:
    """A misspelt variable would be ignored silently (settings read ALEPHANT_<FIELD> only)."""
    for proc in PROCESSES:
        assert (COMMON_ENV | proc.env) <= SETTINGS_VARS, (COMMON_ENV | proc.env) - SETTINGS_VARS
    assert set(DURABILITY_ENV) <= COMMON_ENV


def test_the_local_cluster_runs_the_topology() -> None:
    """`alephant dev --cluster` (deploy/cluster.py) starts the same counts and projector split."""
    cluster = pytest.importorskip("deploy.cluster")
    defaults = {f.name: f.default for f in dataclasses.fields(cluster.ClusterStack)}
    assert defaults["workers"] == process("dataplane").replicas
    assert defaults["controlplanes"] == process("controlplane").replicas
    assert defaults["projectors"] == sum(p.replicas for p in PROCESSES if p.command[0] == "projector")
    assert defaults["nats_nodes"] == NATS_NODES
    assert tuple(cluster.SHARED_PROJECTIONS) == SHARED_PROJECTIONS
    assert process("projector-shared").command == ("projector", *(a for n in SHARED_PROJECTIONS for a in ("--only", n)))
