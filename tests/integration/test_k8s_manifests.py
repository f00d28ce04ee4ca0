"""deploy/k8s renders, validates and is wired right: what `kubectl apply -k` would get, checked offline.

Every overlay is rendered with `kubectl kustomize`. Built-in kinds are validated against the
Kubernetes schemas `kubernetes-validate` bundles; the ScaledObject against KEDA's CRD and the
Certificates/Issuers against cert-manager's (their CRDs are kept in deploy/k8s/schemas). Then the
wiring a typo would break and no schema sees: Service selectors, probe and target ports, secrets,
drain times, the autoscaler's query against the router's real metrics, and the network paths.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.router import metrics as router_metrics

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ("dev", "gpu")
KUBERNETES_VERSION = "1.33.0"
CRDS = ("keda.sh_scaledobjects.yaml", "cert-manager.io_certificates.yaml", "cert-manager.io_issuers.yaml")
# Secrets the operator creates out of band (documented in base/registry.yaml), per overlay.
EXTERNAL_SECRETS = {"dev": set(), "gpu": {"loraplex-registry"}}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def _render(target: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make install` installs it (apt-get install kubectl)"
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _render(f"overlays/{request.param}")


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from the CRDs kept in the repo."""
    schemas = {}
    for name in CRDS:
        crd = yaml.safe_load((K8S / "schemas" / name).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schemas[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return schemas


def _of(docs: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] == kind)


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _ports(workload: dict[str, Any]) -> dict[str | int, int]:
    """Container ports by name and by number -> number."""
    found: dict[str | int, int] = {}
    for c in _pod_spec(workload)["containers"]:
        for p in c.get("ports", ()):
            found[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                found[p["name"]] = p["containerPort"]
    return found


def test_base_and_every_overlay_render() -> None:
    for target in ("base", *(f"overlays/{o}" for o in OVERLAYS)):
        kinds = {d["kind"] for d in _render(target)}
        assert {"Deployment", "Service", "NetworkPolicy", "Job"} <= kinds, target


def test_every_object_validates_against_its_schema(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    crds = _crd_schemas()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in crds:
            jsonschema.validate(doc, crds[key])
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_an_invalid_object_is_caught() -> None:
    """The validators above are not vacuous: a typo'd field and a bad ScaledObject fail."""
    deployment = next(_of(_render("base"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = next(_of(_render("base"), "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, _crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")])


def test_services_select_workloads_and_their_ports_exist(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in _of(docs, "Service"):
        selected = [w for w in workloads if _matches(svc["spec"]["selector"], _labels(w))]
        assert selected, f"Service {svc['metadata']['name']} selects no workload"
        for w in selected:
            for port in svc["spec"]["ports"]:
                assert port.get("targetPort", port["port"]) in _ports(w), (svc["metadata"]["name"], port)


def test_probes_reach_ports_that_exist_and_speak_mtls(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for w in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        ports = _ports(w)
        for c in _pod_spec(w)["containers"]:
            probes = [c[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c]
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            for probe in probes:
                assert "grpc" not in probe, "the kubelet's gRPC probe is plaintext; these ports are mTLS"
                if "tcpSocket" in probe:
                    assert probe["tcpSocket"]["port"] in ports, (c["name"], probe)
                elif "exec" in probe and "services.common.probe" in probe["exec"]["command"]:
                    port = int(probe["exec"]["command"][-1].rpartition(":")[2])
                    assert port in ports, (c["name"], probe)


def test_drain_fits_in_the_termination_grace(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for w in _of(docs, "Deployment"):
        pod = _pod_spec(w)
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", ())}
            drain = float(env.get("LORAPLEX_DRAIN_GRACE_S") or 30)
            pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert pod["terminationGracePeriodSeconds"] > drain + pause, w["metadata"]["name"]
            names = [e["name"] for e in c.get("env", ())]
            for i, e in enumerate(c.get("env", ())):
                for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    assert ref in names[:i], f"{e['name']} uses $({ref}) before it is defined"


def test_containers_run_as_non_root_with_limits(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for w in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        pod = _pod_spec(w)
        assert pod["securityContext"]["runAsNonRoot"] is True, w["metadata"]["name"]
        for c in [*pod.get("initContainers", ()), *pod["containers"]]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "memory" in c["resources"]["limits"] and c["resources"]["requests"]


def test_secrets_and_volumes_resolve(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    available = {d["metadata"]["name"] for d in _of(docs, "Secret")}
    available |= {d["spec"]["secretName"] for d in _of(docs, "Certificate")}
    available |= EXTERNAL_SECRETS[overlay]
    for w in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        pod = _pod_spec(w)
        for v in pod.get("volumes", ()):
            if "secret" in v:
                assert v["secret"]["secretName"] in available, v
        for c in [*pod.get("initContainers", ()), *pod["containers"]]:
            for e in c.get("env", ()):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in available, (w["metadata"]["name"], ref)
            for src in c.get("envFrom", ()):
                assert src["secretRef"]["name"] in available
            mounted = {m["name"] for m in c.get("volumeMounts", ())}
            assert mounted <= {v["name"] for v in pod.get("volumes", ())} | {
                t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", ())
            }


def test_autoscalers_target_real_workloads_and_real_router_metrics() -> None:
    docs = _render("overlays/gpu")
    deployments = {d["metadata"]["name"]: d for d in _of(docs, "Deployment")}
    exported = {
        m._name for m in (router_metrics.PENDING, router_metrics.INFLIGHT, router_metrics.LIVE_WORKERS)
    }
    scaled = list(_of(docs, "ScaledObject"))
    assert scaled, "every worker pool scales with KEDA"
    for so in scaled:
        spec = so["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert spec["minReplicaCount"] == 0 and "cooldownPeriod" in spec
        trigger = spec["triggers"][0]
        assert trigger["type"] == "prometheus" and "activationThreshold" in trigger["metadata"]
        query = trigger["metadata"]["query"]
        names = set(re.findall(r"(loraplex_\w+)\{", query))
        assert names == {"loraplex_router_pending_requests", "loraplex_router_inflight_requests"}
        assert names <= exported, names - exported
        # The query counts the model this pool serves, and nothing else.
        env = {e["name"]: e.get("value") for e in _pod_spec(target)["containers"][0]["env"]}
        assert set(re.findall(r'base_model="([^"]+)"', query)) == {env["LORAPLEX_MODEL"]}
    for hpa in _of(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


def _allowed_paths(docs: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    """(source, destination app, port) that the NetworkPolicies let through. Sources: each workload's
    app, "monitoring" (a pod in the monitoring namespace) and "client" (outside the namespace)."""
    apps = {_labels(w)["app"]: w for w in docs if w["kind"] in WORKLOAD_KINDS}
    policies = list(_of(docs, "NetworkPolicy"))
    sources = {**{a: (_labels(w), "loraplex") for a, w in apps.items()}, "monitoring": ({}, "monitoring")}
    sources["client"] = ({}, "elsewhere")
    paths = set()
    for dst, w in apps.items():
        ports = set(_ports(w).values())
        for policy in policies:
            if not _matches(policy["spec"]["podSelector"].get("matchLabels", {}), _labels(w)):
                continue
            for rule in policy["spec"].get("ingress", ()):
                rule_ports = {p["port"] for p in rule.get("ports", ())} or ports
                for src, (labels, ns) in sources.items():
                    peers = rule.get("from")
                    ok = peers is None or any(
                        (
                            "podSelector" in p
                            and ns == "loraplex"
                            and _matches(p["podSelector"]["matchLabels"], labels)
                        )
                        or (
                            "namespaceSelector" in p
                            and p["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": ns}
                        )
                        for p in peers
                    )
                    if ok:
                        paths |= {(src, dst, port) for port in rule_ports & ports}
    return paths


def test_network_policies_allow_exactly_the_listed_paths() -> None:
    docs = _render("overlays/dev")
    assert any(
        p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in _of(docs, "NetworkPolicy")
    )
    everyone = (
        "client",
        "monitoring",
        "loraplex-router",
        "loraplex-worker",
        "loraplex-registry",
        "loraplex-migrate",
        "loraplex-postgres",
    )
    expected = {(src, "loraplex-router", port) for src in everyone for port in (50050, 8080)}
    expected |= {("monitoring", "loraplex-router", 9090), ("monitoring", "loraplex-worker", 9090)}
    expected |= {("loraplex-router", "loraplex-worker", 50052)}
    expected |= {
        ("loraplex-router", "loraplex-registry", 50051),
        ("loraplex-worker", "loraplex-registry", 50051),
    }
    expected |= {
        ("loraplex-registry", "loraplex-postgres", 5432),
        ("loraplex-migrate", "loraplex-postgres", 5432),
    }
    assert _allowed_paths(docs) == expected
