"""Deployment files: the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate), the
KEDA objects scale on the streams Axion really uses, compose.yaml and the Dockerfiles hold together, and every
setting they pass is one Axion reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml

from common import keys
from common.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
THIRD_PARTY_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
SETTINGS = {f.encode_name for f in msgspec.structs.fields(Settings)}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _base_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _docs(K8S / "base" / name)]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in _base_objects() if o["kind"] == kind}


def test_kustomizations_name_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for name in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            assert (kustomization.parent / name).exists(), f"{kustomization}: {name} is missing"


@pytest.mark.parametrize("obj", [o for o in _base_objects() if not o["apiVersion"].startswith("keda.sh/")],
                         ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_core_objects_validate_against_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_gpu_overlay_patches_a_real_deployment_with_a_gpu() -> None:
    patch = _docs(K8S / "overlays" / "gpu" / "chat-worker-gpu.yaml")[0]
    assert patch["metadata"]["name"] in _by_kind("Deployment")
    container = patch["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"] for e in container["env"]} <= SETTINGS


def test_probes_and_termination_match_the_processes() -> None:
    deployments = _by_kind("Deployment")
    api = deployments["axion-api"]["spec"]["template"]["spec"]
    container = api["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    open_paths = next(e["value"] for e in container["env"] if e["name"] == "OPEN_PATHS").split(",")
    assert {"/health", "/health/ready"} <= set(open_paths), "kubelet probes carry no API key"
    assert api["terminationGracePeriodSeconds"] > 30  # uvicorn drains streams for 30 s
    kinds = set()
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            assert c["command"][:1] == ["axion"] and c["command"][1] in ("api", "worker", "batch-worker"), name
            kinds |= {e["value"] for e in c.get("env", []) if e["name"] == "WORKER_KIND"}
    assert kinds == {"chat", "embed", "rerank"}
    assert _by_kind("PodDisruptionBudget")


def test_every_setting_passed_is_one_axion_reads() -> None:
    config = _by_kind("ConfigMap")["axion-settings"]["data"]
    assert set(config) <= SETTINGS | THIRD_PARTY_ENV, set(config) - SETTINGS - THIRD_PARTY_ENV
    msgspec.convert({k: v for k, v in config.items() if k in SETTINGS}, Settings, strict=False)
    for deployment in _by_kind("Deployment").values():
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert {e["name"] for e in c.get("env", [])} <= SETTINGS


def test_keda_scales_each_worker_on_its_stream_lag() -> None:
    config = _by_kind("ConfigMap")["axion-settings"]["data"]
    deployments = _by_kind("Deployment")
    expected = {"axion-chat-worker": keys.chat_stream(config["MODEL_NAME"]),
                "axion-embed-worker": keys.embed_stream(config["EMBEDDING_MODEL"]),
                "axion-rerank-worker": keys.rerank_stream(config["RERANK_MODEL"])}
    scaled = _by_kind("ScaledObject")
    assert {o["spec"]["scaleTargetRef"]["name"] for o in scaled.values()} == set(expected)
    for obj in scaled.values():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        target = obj["spec"]["scaleTargetRef"]["name"]
        assert target in deployments
        assert obj["spec"]["minReplicaCount"] == 0  # lagCount is the measure that can scale to zero
        (trigger,) = obj["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == expected[target]
        assert meta["consumerGroup"] == keys.WORKER_GROUP
        assert int(meta["lagCount"]) > 0 and "pendingEntriesCount" not in meta


def test_compose_file_holds_together() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["healthcheck"]["test"]
    roles: dict[str, str] = {}
    for name, service in services.items():
        if name == "redis":
            continue
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        env = service["environment"]
        assert set(env) <= SETTINGS, (name, set(env) - SETTINGS)
        assert service["command"][:1] == ["axion"], name
        role = service["command"][1]
        roles[name] = role if role in ("api", "batch-worker") else env["WORKER_KIND"]
        if service["command"][1] == "api":
            assert service["healthcheck"]["test"], name
    assert sorted(roles.values()) == ["api", "api", "batch-worker", "chat", "chat", "embed", "rerank"]
    assert services["chat-worker-cpu"]["profiles"] == ["cpu"]
    gpu = services["chat-worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "Dockerfile.cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert set(compose["volumes"]) == {"models", "redis-data"}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_are_multi_stage_and_non_root(name: str) -> None:
    lines = [line.strip() for line in (REPO / name).read_text().splitlines()]
    assert sum(line.startswith("FROM ") for line in lines) >= 2
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] != "USER root"
    assert any(line.startswith("VOLUME") and "/models" in line for line in lines)
    if name == "Dockerfile":
        assert any(line.startswith("HEALTHCHECK") for line in lines)
