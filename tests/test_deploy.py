"""The Kubernetes/KServe manifests in deploy/, checked offline: every object against the real
schema (kubernetes-validate strict for Kubernetes 1.31, KServe's published InferenceService and
ServingRuntime CRDs), the validator against broken objects, and the manifests against the project itself
(config.properties' ports, the guard's CLI and health paths, the metrics TorchServe and our
handler export, the drain hook against real heartbeat files)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import promql_parser
import pytest
import yaml

from deploy import validate
from morph_protocol.control import BUSY, IDLE, ControlDir, Heartbeat
from morph_protocol.properties import read_properties

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
TS_JAR = Path(importlib.util.find_spec("ts").origin).parent / "frontend" / "model-server.jar"
LOOPBACK_LISTENERS = ("inference_address", "management_address", "grpc_inference_address",
                      "grpc_management_address")
LOOPBACK_PORTS = (8080, 8081, 7170, 7071)


@pytest.fixture(scope="module")
def manifests() -> list[Any]:
    return validate.load_manifests(validate.manifest_files())


def find(manifests: list[Any], kind: str, name: str) -> dict[str, Any]:
    matches = [m.doc for m in manifests if m.kind == kind and m.name == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def host_port(value: str) -> tuple[str, int]:
    """'http://127.0.0.1:8080' or '0.0.0.0:7070' -> (host, port)."""
    host, _, port = value.split("://")[-1].rpartition(":")
    return host, int(port)


def cluster_properties(manifests: list[Any]) -> dict[str, str]:
    text = find(manifests, "ConfigMap", "diffmorpher-config")["data"]["config.properties"]
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


# ---------------------------------------------------------------------------- schemas
def test_every_manifest_is_valid_against_kubernetes_1_31_strict_and_kserves_crd(manifests) -> None:
    kinds = sorted({m.kind for m in manifests})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "InferenceService",
                     "PersistentVolumeClaim", "Pod", "PodDisruptionBudget", "Service", "ServingRuntime"]
    assert list(validate.errors(manifests)) == []
    assert validate.KUBERNETES_VERSION == "1.31"


def test_the_command_line_validates_every_manifest(tmp_path: Path) -> None:
    """`python -m deploy.validate`, from any directory."""
    result = subprocess.run([sys.executable, "-m", "deploy.validate"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    count = len(validate.load_manifests(validate.manifest_files()))
    assert f"{count}/{count} manifests valid (Kubernetes 1.31 strict; KServe" in result.stdout


def _set(*path: str | int, value: Any) -> Any:
    """A mutation that sets the field at `path` (keys and list indexes) to `value`."""
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return mutate


POD = ("spec", "template", "spec")
MODEL = ("spec", "predictor", "model")
RUNTIME = ("spec", "containers", 0)
BROKEN = {
    # id: (kind, name, mutation, words the error must contain)
    "deployment-string-for-int": ("Deployment", "diffmorpher", _set("spec", "revisionHistoryLimit", value="3"),
                                  ["spec.revisionHistoryLimit", "'3' is not of type 'integer'"]),
    "deployment-string-port": ("Deployment", "diffmorpher", _set(*POD, "containers", 1, "ports", 0, "containerPort", value="7070"),
                               ["spec.template.spec.containers.1.ports.0.containerPort", "not of type 'integer'"]),
    "deployment-unknown-probe-field": ("Deployment", "diffmorpher",
                                       _set(*POD, "containers", 0, "livenessProbe", "httpGet", "paht", value="/livez"),
                                       ["livenessProbe.httpGet", "'paht' was unexpected"]),
    "deployment-string-for-bool": ("Deployment", "diffmorpher", _set(*POD, "shareProcessNamespace", value="yes"),
                                   ["spec.template.spec.shareProcessNamespace", "not of type 'boolean'"]),
    "hpa-string-for-int": ("HorizontalPodAutoscaler", "diffmorpher", _set("spec", "maxReplicas", value="8"),
                           ["spec.maxReplicas", "not of type 'integer'"]),
    "hpa-unknown-field": ("HorizontalPodAutoscaler", "diffmorpher", _set("spec", "metrics", 0, "pods", "metric", "nme", value="x"),
                          ["spec.metrics.0.pods.metric", "'nme' was unexpected"]),
    "service-string-port": ("Service", "diffmorpher", _set("spec", "ports", 0, "port", value="7070"),
                            ["spec.ports.0.port", "not of type 'integer'"]),
    "isvc-unknown-field": ("InferenceService", "diffmorpher", _set(*MODEL, "storageURI", value="pvc://x"),
                           ["spec.predictor.model", "'storageURI' was unexpected"]),
    "isvc-string-for-int": ("InferenceService", "diffmorpher", _set("spec", "predictor", "minReplicas", value="1"),
                            ["spec.predictor.minReplicas", "'1' is not of type 'integer'"]),
    "isvc-int-for-string": ("InferenceService", "diffmorpher", _set(*MODEL, "protocolVersion", value=2),
                            ["spec.predictor.model.protocolVersion", "2 is not of type 'string'"]),
    "isvc-bad-quantity": ("InferenceService", "diffmorpher", _set(*MODEL, "resources", value={"limits": {"nvidia.com/gpu": "one"}}),
                          ["spec.predictor.model.resources.limits.nvidia.com/gpu", "'one' does not match"]),
    "isvc-unknown-component": ("InferenceService", "diffmorpher", _set("spec", "predictors", value={}),
                               ["spec", "'predictors' was unexpected"]),
    "isvc-bad-label": ("InferenceService", "diffmorpher", _set("metadata", "labels", "app.kubernetes.io/name", value=7),
                       ["metadata.labels.app.kubernetes.io/name", "not of type 'string'"]),
    "isvc-wrong-version": ("InferenceService", "diffmorpher", _set("apiVersion", value="serving.kserve.io/v1alpha1"),
                           ["apiVersion must be serving.kserve.io/v1beta1"]),
    "runtime-unknown-field": ("ServingRuntime", "diffmorpher", _set("spec", "supportedModelFormat", value=[]),
                              ["spec", "'supportedModelFormat' was unexpected"]),
    "runtime-string-for-bool": ("ServingRuntime", "diffmorpher", _set("spec", "supportedModelFormats", 0, "autoSelect", value="no"),
                                ["spec.supportedModelFormats.0.autoSelect", "'no' is not of type 'boolean'"]),
    "runtime-format-without-name": ("ServingRuntime", "diffmorpher", _set("spec", "supportedModelFormats", 0, value={"version": "1"}),
                                    ["spec.supportedModelFormats.0", "'name' is a required property"]),
    "runtime-string-port": ("ServingRuntime", "diffmorpher", _set(*RUNTIME, "ports", 0, "containerPort", value="7070"),
                            ["spec.containers.0.ports.0.containerPort", "not of type 'integer'"]),
    "runtime-unknown-probe-field": ("ServingRuntime", "diffmorpher", _set(*RUNTIME, "readinessProbe", "httpGet", "paht", value="/"),
                                    ["spec.containers.0.readinessProbe.httpGet", "'paht' was unexpected"]),
    "runtime-bad-quantity": ("ServingRuntime", "diffmorpher", _set(*RUNTIME, "resources", "limits", "nvidia.com/gpu", value="one"),
                             ["spec.containers.0.resources.limits.nvidia.com/gpu", "'one' does not match"]),
    "runtime-wrong-version": ("ServingRuntime", "diffmorpher", _set("apiVersion", value="serving.kserve.io/v1beta1"),
                              ["apiVersion must be serving.kserve.io/v1alpha1"]),
}


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_the_validator_refuses_a_broken_manifest(manifests, case) -> None:
    kind, name, mutate, words = case
    original = next(m for m in manifests if m.kind == kind and m.name == name)
    doc = copy.deepcopy(original.doc)
    mutate(doc)
    with pytest.raises(validate.ManifestError) as raised:
        validate.validate(validate.Manifest(original.path, original.index, doc))
    for word in words:
        assert word in str(raised.value), str(raised.value)
    validate.validate(original)  # the untouched manifest still passes


def test_closing_the_crd_schema_keeps_fields_kserve_leaves_open() -> None:
    schema = {"type": "object", "properties": {
        "typed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
    }}
    result = validate.closed(schema)
    assert result["additionalProperties"] is False
    assert result["properties"]["typed"]["additionalProperties"] is False
    assert "additionalProperties" not in result["properties"]["free"]
    assert result["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in result["properties"]["typed"]["properties"]  # a field named so


def test_the_vendored_schemas_are_kserves_published_crds_of_one_release() -> None:
    source = validate.schema_source()
    assert re.fullmatch(r"https://github\.com/kserve/kserve v\d+\.\d+\.\d+ \(commit [0-9a-f]{40}\)", source), source
    paths = {"InferenceService": "config/crd/full/serving.kserve.io_inferenceservices.yaml",
             "ServingRuntime": "config/crd/full/serving.kserve.io_servingruntimes.yaml"}
    assert set(validate.KSERVE_KINDS) == set(paths)
    for kind, (api_version, schema_path) in validate.KSERVE_KINDS.items():
        assert validate.schema_source(schema_path) == source, kind  # the same release for both
        header = schema_path.read_text()[:600]
        assert header.startswith(f"# {kind} {api_version.split('/')[1]} openAPIV3Schema")
        assert f"# path:   {paths[kind]}" in header
        assert schema_path == vendor_script().output_path(kind)
    schema = validate.read_vendored_schema()
    assert sorted(schema["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    model = schema["properties"]["spec"]["properties"]["predictor"]["properties"]["model"]["properties"]
    assert {"modelFormat", "runtime", "storageUri", "protocolVersion", "resources"} <= set(model)
    runtime = validate.read_vendored_schema(validate.KSERVE_KINDS["ServingRuntime"][1])["properties"]["spec"]
    assert runtime["required"] == ["containers"]
    assert {"supportedModelFormats", "protocolVersions", "containers", "volumes", "annotations",
            "multiModel"} <= set(runtime["properties"])


def vendor_script() -> Any:
    """deploy/schemas/vendor_kserve_schema.py, a script, loaded as a module."""
    path = DEPLOY / "schemas" / "vendor_kserve_schema.py"
    spec = importlib.util.spec_from_file_location("vendor_kserve_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vendoring_script_copies_the_schema_of_the_named_kind_verbatim() -> None:
    """A CRD file with both kinds' CRDs (and two versions): each kind gets its own version's
    schema, unchanged, under a header naming kind, release and path."""
    def crd(kind: str, versions: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "spec": {"names": {"kind": kind}, "versions": [
                    {"name": name, "schema": {"openAPIV3Schema": schema}} for name, schema in versions.items()]}}
    runtime_schema = {"type": "object", "properties": {"spec": {"type": "object", "required": ["containers"]}}}
    text = yaml.safe_dump_all([
        crd("InferenceService", {"v1beta1": {"type": "object", "description": "isvc"}}),
        crd("ServingRuntime", {"v1alpha1": runtime_schema, "v1beta9": {"type": "string"}}),
    ])
    script = vendor_script()
    assert script.crd_schema(text, "ServingRuntime") == runtime_schema
    assert script.crd_schema(text, "InferenceService") == {"type": "object", "description": "isvc"}
    with pytest.raises(ValueError, match="expected one ClusterServingRuntime CRD, found 0"):
        script.crd_schema(text, "ClusterServingRuntime", "v1alpha1")
    rendered = script.render(runtime_schema, "kserve/kserve", "v0.20.0", "a" * 40,
                             script.KINDS["ServingRuntime"][1], "ServingRuntime")
    assert rendered.startswith("# ServingRuntime v1alpha1 openAPIV3Schema")
    assert json.loads("".join(line for line in rendered.splitlines() if not line.startswith("#"))) == runtime_schema
    with pytest.raises(ValueError, match="40 hex digits"):
        script.render(runtime_schema, "kserve/kserve", "v0.20.0", "abc", "x", "ServingRuntime")


# ---------------------------------------------------------------------------- kustomize layout
def test_each_kustomization_lists_its_folders_manifests(manifests) -> None:
    manual = {DEPLOY / "storage" / "loader-pod.yaml"}  # applied by hand, for one copy
    listed: set[Path] = set()
    for kustomization in sorted(DEPLOY.rglob("kustomization.yaml")):
        doc = yaml.safe_load(kustomization.read_text())
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and doc["kind"] == "Kustomization"
        for resource in doc["resources"]:
            path = kustomization.parent / resource
            assert path.is_file(), f"{kustomization} lists missing {resource}"
            listed.add(path)
    assert {m.path for m in manifests} == listed | manual


# ---------------------------------------------------------------------------- agreement with the project
ALLOWED_DIFFERENCES = {
    # key: value in the pod's config.properties (why: deploy/base/configmap.yaml's header)
    "metrics_address": "http://0.0.0.0:8082",
    "diffmorpher.gateway_address": "0.0.0.0:7070",
    "diffmorpher.health_address": "0.0.0.0:8090",
    "model_store": "/models/model-store",
    "metrics_config": "/srv/diffmorpher/handler/metrics.yaml",
}


def test_the_pods_config_properties_is_the_repositorys_but_for_listeners_and_paths(manifests) -> None:
    repo = read_properties(REPO_ROOT / "config.properties")
    pod = cluster_properties(manifests)
    assert set(pod) == set(repo)
    differing = {key: pod[key] for key in pod if pod[key] != repo[key]}
    assert differing == ALLOWED_DIFFERENCES
    for key in ("metrics_address", "diffmorpher.gateway_address", "diffmorpher.health_address"):
        assert host_port(pod[key])[1] == host_port(repo[key])[1], key  # same port, reachable host
    for key in LOOPBACK_LISTENERS:
        assert pod[key].split("://")[-1].startswith("127.0.0.1"), key
    assert pod["disable_token_authorization"] == "false"


def _port_number(item: dict[str, Any], ports: list[dict[str, Any]]) -> int:
    """A containerPort, or a port name resolved among `ports`."""
    value = item["port"] if "port" in item else item["targetPort"]
    if isinstance(value, int):
        return value
    (named,) = [p for p in ports if p["name"] == value]
    return named["containerPort"]


def test_ports_in_the_manifests_are_config_properties_ports(manifests) -> None:
    pod = cluster_properties(manifests)
    gateway = host_port(pod["diffmorpher.gateway_address"])[1]
    health = host_port(pod["diffmorpher.health_address"])[1]
    metrics = host_port(pod["metrics_address"])[1]
    assert (gateway, health, metrics) == (7070, 8090, 8082)
    deployment = find(manifests, "Deployment", "diffmorpher")
    guard, torchserve = container(deployment, "guard"), container(deployment, "torchserve")
    assert {(p["name"], p["containerPort"]) for p in guard["ports"]} == {("grpc", gateway), ("health", health)}
    assert {(p["name"], p["containerPort"]) for p in torchserve["ports"]} == {("metrics", metrics)}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    for service in ("diffmorpher", "diffmorpher-pods"):
        for port in find(manifests, "Service", service)["spec"]["ports"]:
            assert port["port"] == _port_number({"targetPort": port["targetPort"]}, guard["ports"])
            assert port["port"] in (gateway, health)
    assert find(manifests, "Service", "diffmorpher-pods")["spec"]["clusterIP"] == "None"
    declared = [p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
    assert not set(declared) & set(LOOPBACK_PORTS)  # TorchServe's own ports stay internal
    assert host_port(pod["grpc_inference_address"] + ":" + pod["grpc_inference_port"])[1] == 7170


def test_probes_hit_the_guards_health_endpoints(manifests) -> None:
    pod = cluster_properties(manifests)
    health = host_port(pod["diffmorpher.health_address"])[1]
    deployment = find(manifests, "Deployment", "diffmorpher")
    guard, torchserve = container(deployment, "guard"), container(deployment, "torchserve")
    probes = {
        (name, kind): (probe["httpGet"]["path"], _port_number(probe["httpGet"], c.get("ports", [])))
        for name, c in (("guard", guard), ("torchserve", torchserve))
        for kind in ("readinessProbe", "livenessProbe", "startupProbe") if (probe := c.get(kind))
    }
    assert probes == {
        ("guard", "readinessProbe"): ("/healthz", health),  # 503 while a worker is dead/wedged/stalled
        ("guard", "livenessProbe"): ("/status", health),  # the guard process itself
        ("torchserve", "startupProbe"): ("/healthz", health),  # model loaded, worker up
        ("torchserve", "livenessProbe"): ("/livez", health),  # unhealthy 5 min despite repairs
    }
    startup = torchserve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(pod["default_startup_timeout"])


def test_the_guard_runs_as_the_makefile_runs_it_with_flags_it_has(manifests) -> None:
    deployment = find(manifests, "Deployment", "diffmorpher")
    spec = deployment["spec"]["template"]["spec"]
    guard, torchserve = container(deployment, "guard"), container(deployment, "torchserve")
    command = guard["command"]
    assert command[:3] == ["python", "-m", "guard"]
    help_text = subprocess.run([sys.executable, "-m", "guard", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=REPO_ROOT)
    assert help_text.returncode == 0, help_text.stderr
    flags = [arg for arg in command if arg.startswith("--")]
    assert flags == ["--ts-config", "--key-file", "--client-tokens", "--interval", "--wedge-after", "--stall-after"]
    for flag in flags:
        assert flag in help_text.stdout
    ts_config = command[command.index("--ts-config") + 1]
    assert ts_config == torchserve["command"][torchserve["command"].index("--ts-config") + 1]
    assert torchserve["command"][:3] == ["torchserve", "--start", "--foreground"]
    # TorchServe writes key_file.json into the directory it starts from; the guard reads it there.
    key_file = Path(command[command.index("--key-file") + 1])
    assert key_file.name == "key_file.json" and str(key_file.parent) == torchserve["workingDir"]
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (guard, torchserve)}
    assert mounts["guard"][str(key_file.parent)] == mounts["torchserve"][str(key_file.parent)] == "run"
    assert Path(ts_config).parent.as_posix() in mounts["guard"] and Path(ts_config).parent.as_posix() in mounts["torchserve"]
    # One control directory for the gateway/watchdog and the workers, on the shared volume.
    control = {c["name"]: {e["name"]: e.get("value") for e in c["env"]}["DIFFMORPHER_CONTROL_DIR"] for c in (guard, torchserve)}
    assert control["guard"] == control["torchserve"] and control["guard"].startswith(str(key_file.parent) + "/")
    env = {e["name"]: e for e in torchserve["env"]}
    assert env["DIFFMORPHER_CACHE_DIR"]["value"] in mounts["torchserve"]
    assert env["DIFFMORPHER_CACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # Client tokens: the required Secret, mounted whole (a subPath mount would never be updated).
    tokens_path = command[command.index("--client-tokens") + 1]
    tokens_mount = next(m for m in guard["volumeMounts"] if m["mountPath"] == tokens_path)
    assert tokens_mount["readOnly"] is True and "subPath" not in tokens_mount
    volume = next(v for v in spec["volumes"] if v["name"] == tokens_mount["name"])
    assert volume["secret"]["secretName"] == "diffmorpher-client-tokens"
    assert volume["secret"].get("optional", False) is False
    assert all(m["name"] != tokens_mount["name"] for m in torchserve["volumeMounts"])  # the guard's alone
    # The watchdog signals worker pids; key_file.json is 0600: one pid namespace, one uid.
    assert spec["shareProcessNamespace"] is True and spec["securityContext"]["runAsUser"] == 1000
    assert all("runAsUser" not in c.get("securityContext", {}) for c in (guard, torchserve))


def test_one_gpu_per_replica(manifests) -> None:
    torchserve = container(find(manifests, "Deployment", "diffmorpher"), "torchserve")
    assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == "1"
    guard = container(find(manifests, "Deployment", "diffmorpher"), "guard")
    assert "nvidia.com/gpu" not in guard["resources"].get("limits", {})
    assert runtime_container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == "1"


# ---------------------------------------------------------------------------- autoscaling
def _metric_declarations() -> dict[str, list[str]]:
    """Metric name -> its dimension names, from handler/metrics.yaml."""
    config = yaml.safe_load((REPO_ROOT / "handler" / "metrics.yaml").read_text())
    declared = {}
    for section in ("ts_metrics", "model_metrics"):
        for entries in config[section].values():
            for entry in entries:
                declared[entry["name"]] = [str(d) for d in entry["dimensions"]]
    return declared


def _selectors(node: Any) -> Iterator[Any]:
    """Every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attribute in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        for item in child if isinstance(child, list) else [child]:
            if item is not None and not isinstance(item, (str, int, float)):
                yield from _selectors(item)


def _adapter_rules() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    configmap = yaml.safe_load((DEPLOY / "prometheus-adapter" / "configmap.yaml").read_text())
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"], values["rules"]["custom"]


def test_the_hpas_scale_on_the_adapter_metric_built_from_exported_metrics(manifests) -> None:
    rules, helm_rules = _adapter_rules()
    assert rules == helm_rules  # the ConfigMap and the Helm values serve the same metric
    (rule,) = rules
    for name, target in (("diffmorpher", "diffmorpher"), ("diffmorpher-predictor", "diffmorpher-predictor")):
        hpa = find(manifests, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
        (metric,) = hpa["spec"]["metrics"]  # work, not CPU
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "800m"}
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    declared = _metric_declarations()
    series = promql_parser.parse(rule["seriesQuery"].strip("'"))
    assert series.name == re.fullmatch(r"\^(\w+)\$", rule["name"]["matches"]).group(1)
    # The query as the adapter sends it for two pods of one namespace.
    query = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod")
             .replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"diffmorpher-a|diffmorpher-b"'))
    selectors = list(_selectors(promql_parser.parse(query)))
    assert sorted(s.name for s in selectors) == ["MorphLatencySeconds", "ts_inference_requests_total"]
    for selector in [*selectors, series]:
        assert selector.name in declared, f"{selector.name} is not in handler/metrics.yaml"
        matchers = {m.name: m.value for m in selector.matchers.matchers}
        for label in set(matchers) - {"namespace", "pod"}:  # namespace/pod come from the scrape
            assert label in declared[selector.name], f"{selector.name} has no label {label}"
            assert matchers[label] == "diffmorpher"
    for selector in selectors:  # scoped to the pods the HPA asks about, not summed over all
        matchers = {m.name: m.value for m in selector.matchers.matchers}
        assert matchers["namespace"] == "ml" and matchers["pod"] == "diffmorpher-a|diffmorpher-b"


def test_torchserve_counts_grpc_arrivals_in_the_counter_the_adapter_rates() -> None:
    """Facts of TorchServe 0.12's frontend the adapter rule relies on (read from its classes):
    ts_inference_requests_total is counted for gRPC calls, the latency counters only for REST."""
    with zipfile.ZipFile(TS_JAR) as jar:
        grpc_inference = jar.read("org/pytorch/serve/grpcimpl/InferenceImpl.class")
        grpc_job = jar.read("org/pytorch/serve/job/GRPCJob.class")
        rest_job = jar.read("org/pytorch/serve/job/RestJob.class")
        tokens = jar.read("org/pytorch/serve/util/TokenAuthorization.class")
    assert b"ts_inference_requests_total" in grpc_inference
    for counter in (b"ts_inference_latency_microseconds", b"ts_queue_latency_microseconds"):
        assert counter in rest_job and counter not in grpc_job
    # Keys are drawn at random by each TorchServe and only ever written to key_file.json:
    # no Secret can hand the same key to every replica (deploy/README.md, "Tokens").
    assert b"java/security/SecureRandom" in tokens and b"key_file.json" in tokens
    assert b"readAllBytes" not in tokens and b"readString" not in tokens


# ---------------------------------------------------------------------------- drain hook
@pytest.fixture()
def drain(manifests, tmp_path: Path) -> Any:
    script = DEPLOY / "image" / "drain.sh"
    control = ControlDir(tmp_path / "control")

    def run(limit_s: int) -> tuple[subprocess.Popen[str], float]:
        env = {**os.environ, "DIFFMORPHER_CONTROL_DIR": str(control.root), "DRAIN_TIMEOUT_S": str(limit_s)}
        return subprocess.Popen(["/bin/sh", str(script)], env=env, stdout=subprocess.PIPE, text=True), time.monotonic()

    return control, run


def test_drain_returns_at_once_when_no_live_worker_is_busy(drain) -> None:
    control, run = drain
    control.write_heartbeat(Heartbeat(pid=os.getpid(), state=IDLE))
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    control.write_heartbeat(Heartbeat(pid=no_such_pid, state=BUSY, call_id="a" * 32))  # a dead worker's
    process, started = run(limit_s=30)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 0 and time.monotonic() - started < 2
    assert "waited 0 s" in out


def test_drain_waits_while_a_live_worker_is_busy_and_stops_at_its_limit(drain) -> None:
    control, run = drain
    worker = subprocess.Popen(["sleep", "30"])
    try:
        control.write_heartbeat(Heartbeat(pid=worker.pid, state=BUSY, call_id="b" * 32, beat=time.time()))
        process, started = run(limit_s=30)
        time.sleep(3)
        assert process.poll() is None  # still waiting for the morph
        control.write_heartbeat(Heartbeat(pid=worker.pid, state=IDLE))
        out, _ = process.communicate(timeout=10)
        elapsed = time.monotonic() - started
        assert process.returncode == 0 and 3 <= elapsed < 6, elapsed
        assert re.search(r"waited [2-6] s", out), out
        control.write_heartbeat(Heartbeat(pid=worker.pid, state=BUSY, call_id="c" * 32))
        process, started = run(limit_s=2)  # a morph that never ends: bounded by the limit
        out, _ = process.communicate(timeout=10)
        assert "waited 2 s" in out and 2 <= time.monotonic() - started < 4
    finally:
        worker.kill()
        worker.wait()


def test_every_container_drains_before_stopping_within_the_grace_period(manifests) -> None:
    """Both containers of a deploy/base pod and the KServe predictor run the image's drain.sh."""
    limit = int(re.search(r"DRAIN_TIMEOUT_S:-(\d+)", (DEPLOY / "image" / "drain.sh").read_text()).group(1))
    deployment = find(manifests, "Deployment", "diffmorpher")
    predictor = find(manifests, "InferenceService", "diffmorpher")["spec"]["predictor"]
    hooks = [container(deployment, name)["lifecycle"] for name in ("guard", "torchserve")] + [runtime_container(manifests)["lifecycle"]]
    for hook in hooks:
        assert hook["preStop"]["exec"]["command"] == ["/bin/sh", image_path("deploy/image/drain.sh")]
    for grace in (deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
                  predictor["terminationGracePeriodSeconds"]):
        assert limit < grace


# ---------------------------------------------------------------------------- KServe variant
def runtime_container(manifests: list[Any]) -> dict[str, Any]:
    """The predictor's container: our ServingRuntime's kserve-container (KServe's predictor
    container name), which the InferenceService's model overrides nowhere."""
    (found,) = [c for c in find(manifests, "ServingRuntime", "diffmorpher")["spec"]["containers"]
                if c["name"] == "kserve-container"]
    return found


def test_the_inferenceservice_runs_on_our_runtime_and_nothing_else(manifests) -> None:
    """How KServe (v0.20, pkg/controller/v1beta1/inferenceservice) picks and builds the predictor:
    `runtime:` is looked up as a ServingRuntime in the namespace, then as a ClusterServingRuntime;
    the runtime must list the model's format (name, and name:version when a version is given)
    and its protocolVersion; the container named kserve-container is merged with the model's
    container fields, its args appended; the server-type annotation or a runtime name KServe
    knows (kserve-torchserve) makes it append "-gpu" to a GPU container's image tag."""
    isvc = find(manifests, "InferenceService", "diffmorpher")
    model = isvc["spec"]["predictor"]["model"]
    runtimes = [m for m in manifests if m.kind in ("ServingRuntime", "ClusterServingRuntime")]
    assert [(m.kind, m.name) for m in runtimes] == [("ServingRuntime", model["runtime"])]
    runtime = runtimes[0].doc
    # Applied together: the runtime lands in the InferenceService's namespace.
    kustomization = yaml.safe_load((DEPLOY / "kserve" / "kustomization.yaml").read_text())
    assert runtimes[0].path.name in kustomization["resources"]
    assert "namespace" not in runtime["metadata"] and "namespace" not in isvc["metadata"]
    spec = runtime["spec"]
    assert spec.get("disabled", False) is False and spec["multiModel"] is False
    formats = {(f["name"], f.get("version")) for f in spec["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert model["modelFormat"]["name"] not in ("pytorch", "triton", "onnx")  # no other runtime's format
    assert all(f.get("autoSelect", False) is False for f in spec["supportedModelFormats"])
    assert model["protocolVersion"] in spec["protocolVersions"] == ["grpc-v2"]
    # The model sets no container fields: every one comes from the runtime, none merged over it.
    assert set(model) == {"runtime", "modelFormat", "protocolVersion", "storageUri"}
    (predictor,) = spec["containers"]
    assert predictor["name"] == "kserve-container" and "args" not in predictor
    assert "serving.kserve.io/server-type" not in runtime["metadata"].get("annotations", {})
    # The predictor's pod fields a runtime cannot carry are on the InferenceService, as in base/.
    deployment = find(manifests, "Deployment", "diffmorpher")
    pod = deployment["spec"]["template"]["spec"]
    assert isvc["spec"]["predictor"]["securityContext"] == pod["securityContext"]
    assert {v["name"]: v for v in spec["volumes"]}["client-tokens"] == {v["name"]: v for v in pod["volumes"]}["client-tokens"]


def test_no_manifest_doc_or_code_names_kserves_torchserve_runtime() -> None:
    """KServe is removing kserve-torchserve (kserve/kserve#5638): only deploy/README.md's
    sentence on why we do not use it names it."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(b"\0")
    naming = []
    for name in filter(None, files):
        path = REPO_ROOT / name.decode()
        if path == Path(__file__) or not path.is_file():
            continue
        if b"kserve-torchserve" in path.read_bytes():
            naming.append(str(path.relative_to(REPO_ROOT)))
    assert naming == ["deploy/README.md"]
    paragraphs = [p for p in (DEPLOY / "README.md").read_text().split("\n\n") if "kserve-torchserve" in p]
    assert len(paragraphs) == 1 and paragraphs[0].count("kserve-torchserve") == 1, paragraphs
    assert "kserve/kserve#5638" in paragraphs[0], paragraphs[0]


def test_kserve_serves_our_archive_from_the_pvc_in_the_layout_the_entrypoint_reads(manifests) -> None:
    isvc = find(manifests, "InferenceService", "diffmorpher")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    claim = find(manifests, "PersistentVolumeClaim", "diffmorpher-model-store")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # hpa.yaml scales it
    hpa = find(manifests, "HorizontalPodAutoscaler", "diffmorpher-predictor")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{isvc['metadata']['name']}-predictor"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (predictor["minReplicas"], predictor["maxReplicas"])
    # The config in the image: the repository's, with the pod's listeners and KServe's mount.
    repo = read_properties(REPO_ROOT / "config.properties")
    kserve = read_properties(DEPLOY / "kserve" / "config.properties")
    assert set(kserve) == set(repo)
    differing = {key: kserve[key] for key in kserve if kserve[key] != repo[key]}
    assert differing == {**ALLOWED_DIFFERENCES, "model_store": "/mnt/models/model-store"}
    assert kserve["disable_token_authorization"] == "false"


def test_the_runtimes_container_is_a_replica_like_the_deployments(manifests) -> None:
    """Our image and entrypoint: gRPC v2 on the gateway's port (the predictor Service's first
    port), the guard's probes and health port, TorchServe's metrics port scraped, the
    client-token Secret, the environment paths the entrypoint reads, base/'s securityContext."""
    runtime = find(manifests, "ServingRuntime", "diffmorpher")
    predictor = runtime_container(manifests)
    deployment = find(manifests, "Deployment", "diffmorpher")
    guard, torchserve = container(deployment, "guard"), container(deployment, "torchserve")
    kserve = read_properties(DEPLOY / "kserve" / "config.properties")
    entrypoint = (DEPLOY / "image" / "kserve-entrypoint.sh").read_text()
    assert predictor["image"].split(":")[0] == torchserve["image"] == "diffmorpher-serving"
    assert predictor["command"] == ["/bin/sh", image_path("deploy/image/kserve-entrypoint.sh")]
    assert image_path("deploy/kserve/config.properties") in entrypoint
    gateway = host_port(kserve["diffmorpher.gateway_address"])[1]
    health = host_port(kserve["diffmorpher.health_address"])[1]
    metrics = host_port(kserve["metrics_address"])[1]
    assert [(p["name"], p["containerPort"], p["protocol"]) for p in predictor["ports"]] == [
        ("h2c", gateway, "TCP"), ("health", health, "TCP"), ("metrics", metrics, "TCP")]
    base_ports = {p["containerPort"] for c in (guard, torchserve) for p in c["ports"]}
    assert {p["containerPort"] for p in predictor["ports"]} == base_ports
    assert not {p["containerPort"] for p in predictor["ports"]} & set(LOOPBACK_PORTS)
    for listener in LOOPBACK_LISTENERS:
        assert kserve[listener].split("://")[-1].startswith("127.0.0.1"), listener
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/healthz"), ("livenessProbe", "/livez")):
        get = predictor[probe]["httpGet"]
        assert (get["path"], _port_number(get, predictor["ports"])) == (path, health), probe
    startup = predictor["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(kserve["default_startup_timeout"])
    # Prometheus scrapes TorchServe's port, as base/'s pods; KServe's own scrape annotation is
    # off (it would name 9091, Knative's queue-proxy port).
    pod_annotations = runtime["spec"]["annotations"]
    assert pod_annotations["prometheus.io/port"] == str(metrics) == deployment["spec"]["template"]["metadata"][
        "annotations"]["prometheus.io/port"]
    isvc_annotations = find(manifests, "InferenceService", "diffmorpher")["metadata"]["annotations"]
    assert isvc_annotations["serving.kserve.io/enable-prometheus-scraping"] == "false"
    env = {e["name"]: e for e in predictor["env"]}
    for name in ("DIFFMORPHER_MODEL_ROOT", "DIFFMORPHER_RUN_DIR", "DIFFMORPHER_CONTROL_DIR", "DIFFMORPHER_CLIENT_TOKENS"):
        assert name in entrypoint, name
    assert env["DIFFMORPHER_MODEL_ROOT"]["value"] + "/model-store" == kserve["model_store"]  # KServe's mount
    assert env["DIFFMORPHER_CONTROL_DIR"]["value"].startswith(env["DIFFMORPHER_RUN_DIR"]["value"] + "/")
    mounts = {m["mountPath"]: m for m in predictor["volumeMounts"]}
    assert env["DIFFMORPHER_RUN_DIR"]["value"] in mounts and env["DIFFMORPHER_CACHE_DIR"]["value"] in mounts
    tokens = mounts[env["DIFFMORPHER_CLIENT_TOKENS"]["value"]]
    assert tokens["readOnly"] is True and "subPath" not in tokens
    volumes = {v["name"] for v in runtime["spec"]["volumes"]}
    assert {m["name"] for m in predictor["volumeMounts"]} == volumes
    assert env["DIFFMORPHER_CACHE_REDIS_URL"] == {e["name"]: e for e in torchserve["env"]}["DIFFMORPHER_CACHE_REDIS_URL"]
    assert predictor["securityContext"] == guard["securityContext"] == torchserve["securityContext"]
    assert predictor["resources"] == torchserve["resources"]


def image_path(relative: str) -> str:
    """Where a repository file is in the image (its WORKDIR), checked to be copied there."""
    dockerfile = (DEPLOY / "image" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    assert any(relative in line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")), relative
    return f"{workdir}/{relative}"


# ---------------------------------------------------------------------------- image
def test_the_image_copies_what_the_pod_runs(manifests) -> None:
    dockerfile = (DEPLOY / "image" / "Dockerfile").read_text()
    ignore = (DEPLOY / "image" / "Dockerfile.dockerignore").read_text().split()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [source for sources in copies for source in sources]
    packages = [f"{name}/" for name in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]]
    assert sources == ["requirements.txt", "constraints.txt", "pyproject.toml", *packages,
                       "deploy/image/drain.sh", "deploy/image/kserve-entrypoint.sh", "deploy/kserve/config.properties"]
    for source in sources:
        assert (REPO_ROOT / source).exists() and f"!{source}" in ignore, source
    assert "-c constraints.txt -r requirements.txt" in dockerfile and "python -m grpc_api.stubs" in dockerfile
    assert "RUN pip install --no-cache-dir --no-deps ." in dockerfile  # the project, installed
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    metrics_config = Path(cluster_properties(manifests)["metrics_config"])
    assert metrics_config.is_relative_to(workdir)
    assert (REPO_ROOT / metrics_config.relative_to(workdir)).is_file()
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)
    assert "PYTHONPATH" not in dockerfile
