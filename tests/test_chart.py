"""The Helm chart (charts/dlmctl) and the image: `helm lint`; `helm template` with default and other values renders
what the operator needs (the ClusterRole is exactly the rules the operator tests prove, the settings reach its
environment, monitors only where prometheus-operator is served, one dashboard ConfigMap per JSON file, one Kueue
LocalQueue per kueue.localQueues entry); wrong values fail naming the field; the API server accepts every rendered
object and Kueue serves the rendered LocalQueues; `helm install` schedules the operator and, with
its ServiceAccount's token, an Experiment reconciles; `helm uninstall` removes what it installed. The Dockerfile pins
pyproject's torch and DeepSpeed, and the chart, the spec and the Dockerfile name one image at the package version
(building it needs a docker engine and a registry, which this machine has not)."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from dlmctl.operator import manifests
from dlmctl.spec.settings import OperatorSettings
from dlmctl.operator.jobs import LABEL_EXPERIMENT
from dlmctl.spec import GROUP, PLURAL, VERSION
from dlmctl.spec.sections import DEFAULT_IMAGE, IMAGE_REPOSITORY, package_version
from testenv import buildenv

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dlmctl"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MONITORS = {"ServiceMonitor", "PodMonitor"}
# Operator settings the chart sets itself (ports from operator.metricsPort/healthPort, the peering it creates).
CHART_MANAGED_SETTINGS = {"metrics_port", "metrics_addr", "health_port", "peering"}

NON_DEFAULT = {
    "operator": {
        "replicas": 3,
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                "matchLabels": {"app.kubernetes.io/component": "operator"}}}}]}},
        "settings": {"reconcile_interval": 2.5, "workers": 4},
        "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"memory": "1Gi"}},
        "priorityClassName": "system-cluster-critical",
    },
    "image": {"repository": "registry.example.com/ml/dlmctl", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-central-1",
           "credentials": {"create": True, "accessKeyId": "AKIDEXAMPLE", "secretAccessKey": "not-a-real-secret"}},
    "monitoring": {"mode": "prometheus-operator", "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"namespace": "monitoring", "folder": "Research"},
}


# ---- helpers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> "Helm":
    buildenv.build(quiet=True)  # milliseconds when built
    return Helm(tmp_path_factory.mktemp("helm"))


class Helm:
    def __init__(self, home: Path):
        self.binary = buildenv.binary("helm")
        # Its own cache: a discovery cache from another run would hide the monitoring API installed here.
        self.env = {**os.environ, **{f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}
        self.home = home

    def run(self, *args, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.binary), *map(str, args)] + (["--kubeconfig", str(kubeconfig)] if kubeconfig else [])
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            pytest.fail(f"helm {' '.join(map(str, args[:2]))} failed:\n{done.stderr}")
        return done

    def values_file(self, values: dict) -> Path:
        path = self.home / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def template_text(self, values: dict | None = None, *, namespace: str = "dlmctl-system", release: str = "dlmctl",
                      api_versions: tuple[str, ...] = (), include_crds: bool = False, chart: Path = CHART) -> str:
        args = ["template", release, chart, "--namespace", namespace, "-f", self.values_file(values or {})]
        args += [a for v in api_versions for a in ("--api-versions", v)]
        return self.run(*args, *(["--include-crds"] if include_crds else [])).stdout

    def template(self, values: dict | None = None, **kw) -> list[dict]:
        return [d for d in yaml.safe_load_all(self.template_text(values, **kw)) if d]

    def refused(self, values: dict) -> str:
        done = self.run("template", "dlmctl", CHART, "-f", self.values_file(values), check=False)
        assert done.returncode != 0, f"accepted: {values}"
        return done.stderr


def one(objects: list[dict], kind: str, component: str | None = None) -> dict:
    """The one object of this kind (of this app.kubernetes.io/component: operator, service, training)."""
    (found,) = [o for o in objects if o["kind"] == kind and (
        component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]
    return found


def container(objects: list[dict], component: str = "operator") -> dict:
    (c,) = one(objects, "Deployment", component)["spec"]["template"]["spec"]["containers"]
    return c


def plain_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def dashboard_files() -> list[Path]:
    return sorted((CHART / "dashboards").glob("*.json"))


# ---- versions and the image -----------------------------------------------------------------------------------

def test_the_chart_the_spec_and_the_image_name_one_image_at_the_package_version(helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = PYPROJECT["project"]["version"]
    assert package_version() == version, "the installed package is the checkout's (pip install -e .)"
    assert chart["version"] == chart["appVersion"] == version
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == IMAGE_REPOSITORY and values["image"]["tag"] == ""
    assert container(helm.template())["image"] == DEFAULT_IMAGE == manifests.DEFAULT_IMAGE == f"{IMAGE_REPOSITORY}:{version}"


def test_the_dockerfile_pins_pyprojects_torch_and_deepspeed_and_leaves_build_tools_behind():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pins = dict(re.findall(r"^ARG (TORCH_VERSION|DEEPSPEED_VERSION)=(\S+)$", dockerfile, re.M))
    train = dict(re.match(r"^([a-z]+)==(\S+)$", r).groups() for r in PYPROJECT["project"]["optional-dependencies"]
                 ["train"] if re.match(r"^(torch|deepspeed)==", r))
    assert pins == {"TORCH_VERSION": train["torch"], "DEEPSPEED_VERSION": train["deepspeed"]}
    assert '"torch==${TORCH_VERSION}"' in dockerfile and '"deepspeed==${DEEPSPEED_VERSION}"' in dockerfile
    assert 'pip install ".[train,operator,service]"' in dockerfile
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2 and " AS builder" in stages[0].splitlines()[0]
    runtime = stages[1]
    assert runtime.splitlines()[0].startswith("python:${PYTHON_VERSION}-slim")
    assert "COPY --from=builder /opt/dlmctl /opt/dlmctl" in runtime
    assert not re.search(r"apt-get|build-essential|gcc|pip install", runtime), "the runtime stage installs nothing"
    assert re.search(r"^USER 1000:1000$", runtime, re.M), "numeric, so the chart's runAsNonRoot can verify it"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "runs"} <= set(ignored)


# ---- helm lint and template --------------------------------------------------------------------------------------

def test_helm_lint_passes_strict(helm):
    helm.run("lint", "--strict", CHART)
    helm.run("lint", "--strict", CHART, "-f", helm.values_file(NON_DEFAULT))


def test_the_default_install(helm):
    objects = helm.template(namespace="dlmctl-system")
    kinds = sorted(o["kind"] for o in objects)
    per_component = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]
    assert kinds == sorted(per_component * 2 + ["ClusterKopfPeering"] + ["ConfigMap"] * len(dashboard_files())), \
        "the operator's objects and the API service's (tests/test_chart_service.py)"
    role, binding = one(objects, "ClusterRole", "operator"), one(objects, "ClusterRoleBinding", "operator")
    assert role["rules"] == manifests.CLUSTER_ROLE_RULES, "exactly the rules the operator tests prove"
    assert role["metadata"]["name"] == binding["roleRef"]["name"] == manifests.NAME
    sa = one(objects, "ServiceAccount", "operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "dlmctl-system"}]

    deployment = one(objects, "Deployment", "operator")
    reference = manifests.deployment("dlmctl-system")
    pod, ref_pod = deployment["spec"]["template"]["spec"], reference["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["securityContext"] == ref_pod["securityContext"]
    c, ref = container(objects), ref_pod["containers"][0]
    for key in ("command", "ports", "livenessProbe", "resources", "securityContext"):
        assert c[key] == ref[key], key
    env = plain_env(c)
    assert env["MALLOC_ARENA_MAX"] == "2" and "AWS_ENDPOINT_URL_S3" not in env
    peering = one(objects, "ClusterKopfPeering")
    assert env["DLMCTL_OPERATOR_PEERING"] == peering["metadata"]["name"] == OperatorSettings().peering
    assert c["envFrom"] == [{"secretRef": {"name": "dlmctl-s3-credentials", "optional": True}}]
    assert not any(k in pod for k in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"))

    # No monitoring.coreos.com/v1 here: Prometheus finds the operator by annotations.
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    assert deployment["spec"]["template"]["metadata"]["annotations"] == scrape
    service = one(objects, "Service", "operator")
    assert service["metadata"]["annotations"] == scrape
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]


def test_one_dashboard_configmap_per_json_file_for_grafanas_sidecar(helm):
    files = dashboard_files()
    maps = {m["metadata"]["name"]: m for m in helm.template() if m["kind"] == "ConfigMap"}
    assert len(maps) == len(files)
    by_file = {name: m for m in maps.values() for name in m["data"]}
    assert sorted(by_file) == [f.name for f in files]
    for f in files:
        cm = by_file[f.name]
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text()), "the dashboard as committed"
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "dlmctl"}
        assert cm["metadata"]["namespace"] == "dlmctl-system"
    moved = [m for m in helm.template(NON_DEFAULT) if m["kind"] == "ConfigMap"]
    assert len(moved) == len(files)
    assert all(m["metadata"]["namespace"] == "monitoring" and m["metadata"]["annotations"] == {"grafana_folder": "Research"}
               for m in moved)
    assert not [m for m in helm.template({"dashboards": {"enabled": False}}) if m["kind"] == "ConfigMap"]


def test_non_default_values_reach_the_objects(helm):
    objects = helm.template(NON_DEFAULT)
    deployment = one(objects, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    operator = NON_DEFAULT["operator"]
    assert deployment["spec"]["replicas"] == 3
    assert (pod["nodeSelector"], pod["tolerations"], pod["affinity"]) == (
        operator["nodeSelector"], operator["tolerations"], operator["affinity"])
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    c = container(objects)
    assert (c["image"], c["imagePullPolicy"]) == ("registry.example.com/ml/dlmctl:0.1.0-rc1", "Always")
    assert c["resources"] == operator["resources"]
    env = plain_env(c)
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-central-1"

    secret = one(objects, "Secret")
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}
    assert c["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"], "optional": False}}]
    assert "checksum/s3-credentials" in deployment["spec"]["template"]["metadata"]["annotations"]
    existing = container(helm.template({"s3": {"credentials": {"existingSecret": "team-s3"}}}))
    assert existing["envFrom"] == [{"secretRef": {"name": "team-s3", "optional": False}}]


def test_the_operator_settings_are_operator_configs_and_reach_it_as_environment(helm, monkeypatch):
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["properties"]["operator"]["properties"]["settings"]["properties"]
    config = OperatorSettings.model_json_schema()["properties"]
    assert set(settings) == set(config) - CHART_MANAGED_SETTINGS
    for name, rule in settings.items():
        assert rule == {k: v for k, v in config[name].items() if k not in ("title", "default", "description")}, name

    values = {"operator": {"settings": {"reconcile_interval": 0.5, "progress_interval": 0, "restart_backoff": 1,
                                        "restart_backoff_max": 60, "peering_lifetime": 6, "workers": 3,
                                        "kueue_check_interval": 7.5},
                           "metricsPort": 9100, "healthPort": 9101, "peering": "team-a"}}
    for name, value in plain_env(container(helm.template(values))).items():
        monkeypatch.setenv(name, value)
    loaded = OperatorSettings()
    assert loaded.model_dump() == {**OperatorSettings.model_construct().model_dump(), **values["operator"]["settings"],
                                   "metrics_port": 9100, "health_port": 9101, "peering": "team-a"}


def test_monitors_only_where_prometheus_operator_is_served_unless_forced(helm):
    def rendered(values=None, **kw):
        objects = helm.template(values, **kw)
        return {o["kind"] for o in objects} & MONITORS, one(objects, "Deployment", "operator")["spec"]["template"][
            "metadata"]

    assert rendered() == (set(), rendered()[1]) and "prometheus.io/scrape" in rendered()[1]["annotations"]
    kinds, pod = rendered(api_versions=("monitoring.coreos.com/v1",))
    assert kinds == MONITORS and "annotations" not in pod
    assert rendered({"monitoring": {"mode": "annotations"}}, api_versions=("monitoring.coreos.com/v1",))[0] == set()
    assert rendered({"monitoring": {"mode": "prometheus-operator"}})[0] == MONITORS
    assert rendered({"monitoring": {"mode": "prometheus-operator", "trainingPods": False}})[0] == {"ServiceMonitor"}


def test_the_monitors_select_the_operator_and_every_training_pod(helm):
    objects = helm.template(NON_DEFAULT)
    service, monitor = one(objects, "Service", "operator"), one(objects, "ServiceMonitor", "operator")
    pods = one(objects, "PodMonitor")
    assert "annotations" not in service["metadata"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # honorLabels: the operator's series carry the experiments' namespaces, which the dashboards select by
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                             "honorLabels": True}]
    assert monitor["metadata"]["labels"]["release"] == pods["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = pods["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["selector"] == {"matchExpressions": [{"key": LABEL_EXPERIMENT, "operator": "Exists"}]}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    assert {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace", "action": "replace"} in \
        endpoint["relabelings"]


def test_one_kueue_local_queue_per_entry_and_none_by_default(helm):
    values = {"kueue": {"localQueues": [{"namespace": "research", "clusterQueue": "team-gpus"},
                                        {"namespace": "team-b", "clusterQueue": "shared.gpus", "name": "batch"}]}}
    objects = helm.template(values, release="dlmctl-queues")
    queues = [o for o in objects if o["kind"] == "LocalQueue"]
    assert [(q["apiVersion"], q["metadata"]["namespace"], q["metadata"]["name"], q["spec"]) for q in queues] == [
        ("kueue.x-k8s.io/v1beta2", "research", "default", {"clusterQueue": "team-gpus"}),
        ("kueue.x-k8s.io/v1beta2", "team-b", "batch", {"clusterQueue": "shared.gpus"})]
    release_labels = {k: v for k, v in one(objects, "ClusterKopfPeering")["metadata"]["labels"].items()
                      if k != "app.kubernetes.io/component"}
    assert release_labels["app.kubernetes.io/instance"] == "dlmctl-queues"
    assert all(q["metadata"]["labels"] == release_labels for q in queues)
    assert not [o for o in helm.template() if o["kind"] == "LocalQueue"]

    helm.run("lint", "--strict", CHART, "-f", helm.values_file(values))
    installed = helm.run("install", "dlmctl", CHART, "--dry-run=client", "--namespace", "dlmctl-system",
                         "-f", helm.values_file(values))
    assert ("Kueue LocalQueues (runs name one in spec.scheduling.queue): research/default for ClusterQueue "
            "team-gpus, team-b/batch for ClusterQueue shared.gpus") in installed.stdout.split("NOTES:", 1)[1]


@pytest.mark.parametrize("values, field", [
    ({"operator": {"replicas": "two"}}, "at '/operator/replicas': got string, want integer"),
    ({"operator": {"replicas": -1}}, "at '/operator/replicas'"),
    ({"operator": {"replica": 3}}, "at '/operator': additional properties 'replica' not allowed"),
    ({"s3": {"endpoint": "minio:9000"}}, "at '/s3/endpoint'"),
    ({"s3": {"credentials": {"create": True}}}, "at '/s3/credentials/accessKeyId'"),
    ({"s3": {"credentials": {"create": True, "accessKeyId": "a", "secretAccessKey": "b", "existingSecret": "x"}}},
     "at '/s3/credentials/existingSecret'"),
    ({"monitoring": {"mode": "yes"}}, "at '/monitoring/mode'"),
    ({"monitoring": {"interval": "30"}}, "at '/monitoring/interval'"),
    ({"operator": {"settings": {"workers": 0}}}, "at '/operator/settings/workers'"),
    ({"operator": {"settings": {"metrics_port": 1}}}, "at '/operator/settings': additional properties 'metrics_port'"),
    ({"operator": {"tolerations": [{"operator": "Maybe"}]}}, "at '/operator/tolerations/0/operator'"),
    ({"imagePullSecrets": ["registry-credentials"]}, "at '/imagePullSecrets/0'"),
    ({"image": {"tag": "v1:2"}}, "at '/image/tag'"),
    ({"serviceAccount": {"create": False}}, "serviceAccount.name: required when serviceAccount.create is false"),
    ({"kueue": {"localQueues": [{"namespace": "research"}]}},
     "at '/kueue/localQueues/0': missing property 'clusterQueue'"),
    ({"kueue": {"localQueues": [{"namespace": "Research", "clusterQueue": "team"}]}},
     "at '/kueue/localQueues/0/namespace'"),
    ({"kueue": {"localQueues": [{"namespace": "research", "clusterQueue": "team", "name": "q" * 64}]}},
     "at '/kueue/localQueues/0/name'"),
    ({"kueue": {"localQueues": [{"namespace": "research", "clusterQueue": "Team_GPUs"}]}},
     "at '/kueue/localQueues/0/clusterQueue'"),
    ({"kueue": {"localQueues": [{"namespace": "research", "cluster_queue": "team"}]}},
     "at '/kueue/localQueues/0': additional properties 'cluster_queue' not allowed"),
], ids=["replicas-a-string", "replicas-negative", "unknown-key", "endpoint-without-scheme", "secret-without-keys",
        "secret-both-ways", "monitoring-mode", "interval-unit", "workers-zero", "chart-managed-setting",
        "toleration-operator", "pull-secret-a-string", "image-tag", "service-account-unnamed",
        "queue-without-cluster-queue", "queue-namespace-uppercase", "queue-name-too-long-for-a-label",
        "cluster-queue-not-a-name", "queue-unknown-key"])
def test_wrong_values_fail_naming_the_field(helm, values, field):
    assert field in helm.refused(values)


# ---- on the test cluster -------------------------------------------------------------------------------------------

def kubectl(cluster, *args, stdin: str | None = None) -> str:
    done = subprocess.run([str(buildenv.binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig), *args],
                          input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args[:2])} failed:\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def monitoring_api(cluster):
    """prometheus-operator's ServiceMonitor and PodMonitor CRDs (pinned in tests/testenv/versions.py) on the cluster."""
    files = buildenv.monitoring_crds()
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", *(a for f in files for a in ("-f", str(f))))
    kubectl(cluster, "wait", "--for=condition=Established", "--timeout=60s",
            *(f"crd/{f.name.removeprefix('monitoring.coreos.com_').removesuffix('.yaml')}.monitoring.coreos.com"
              for f in files))


@pytest.mark.cluster
def test_the_api_server_accepts_every_rendered_object(helm, cluster, cluster_namespace, monitoring_api):
    for values in ({}, {**NON_DEFAULT, "dashboards": {"folder": "Research"}}):
        text = helm.template_text(values, namespace=cluster_namespace, release="dlmctl-dry-run",
                                  api_versions=("monitoring.coreos.com/v1",), include_crds=True)
        documents = [d for d in yaml.safe_load_all(text) if d]
        out = kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--dry-run=server",
                      "--field-manager=test-chart", "-f", "-", stdin=text)
        accepted = [line for line in out.splitlines() if line.endswith("serverside-applied (server dry run)")]
        assert len(accepted) == len(documents), out
        assert {d["kind"] for d in documents} >= {"CustomResourceDefinition", "Deployment", "ClusterRole"} | MONITORS


@pytest.mark.cluster
def test_kueue_serves_the_rendered_local_queues(helm, cluster, cluster_namespace, kueue_queue):
    namespace, local_queues = cluster_namespace, "localqueues.kueue.x-k8s.io"
    team = kueue_queue()  # a ClusterQueue (and a LocalQueue of the test's own) that Kueue reports Active
    cluster_queue = json.loads(kubectl(cluster, "get", local_queues, team, "-n", namespace, "-o", "json"))[
        "spec"]["clusterQueue"]
    values = {"kueue": {"localQueues": [{"namespace": namespace, "clusterQueue": cluster_queue},
                                        {"namespace": namespace, "clusterQueue": cluster_queue, "name": "batch"}]}}
    rendered = [o for o in helm.template(values, namespace=namespace, release="dlmctl-queues")
                if o["kind"] == "LocalQueue"]
    text = yaml.safe_dump_all(rendered)

    def served() -> list[tuple[str, str]]:
        items = json.loads(kubectl(cluster, "get", local_queues, "-n", namespace, "-o", "json",
                                   "-l", "app.kubernetes.io/instance=dlmctl-queues"))["items"]
        return sorted((q["metadata"]["name"], q["spec"]["clusterQueue"]) for q in items)

    kubectl(cluster, "apply", "--server-side", "--field-manager=test-chart", "-f", "-", stdin=text)
    kubectl(cluster, "wait", "--for=condition=Active", "--timeout=60s", "-n", namespace,
            f"{local_queues}/default", f"{local_queues}/batch")
    assert served() == [("batch", cluster_queue), ("default", cluster_queue)]
    kubectl(cluster, "delete", "--wait", "-f", "-", stdin=text)
    assert served() == []


@pytest.mark.cluster
def test_helm_install_schedules_the_operator_and_its_service_account_reconciles(
        helm, cluster, cluster_namespace, monitoring_api, s3_server, tmp_path):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from operator_harness import FAST, Experiments, OperatorProcess, wait_until
    from test_operator import spec

    release, namespace = "dlmctl-chart", cluster_namespace
    settings = {k.removeprefix("DLMCTL_OPERATOR_").lower(): float(v) for k, v in FAST.items()}
    settings["peering_lifetime"] = int(settings["peering_lifetime"])
    values = {"s3": {"endpoint": s3_server.endpoint_url, "credentials": {
                  "create": True, "accessKeyId": s3_server.env()["AWS_ACCESS_KEY_ID"],
                  "secretAccessKey": s3_server.env()["AWS_SECRET_ACCESS_KEY"]}},
              "operator": {"settings": settings}}
    installed = helm.run("install", release, CHART, "--namespace", namespace, "-f", helm.values_file(values),
                         kubeconfig=cluster.kubeconfig)
    assert "kubectl -n " + namespace + " rollout status deployment/dlmctl-chart-operator" in installed.stdout  # NOTES
    try:
        with cluster.api_client() as api:
            apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
            custom, rbac = client.CustomObjectsApi(api), client.RbacAuthorizationV1Api(api)
            deployment = apps.read_namespaced_deployment("dlmctl-chart-operator", namespace)
            assert deployment.spec.replicas == 2
            selector = ",".join(f"{k}={v}" for k, v in deployment.spec.selector.match_labels.items())

            def scheduled() -> bool:
                pods = core.list_namespaced_pod(namespace, label_selector=selector).items
                return len(pods) == 2 and all(p.spec.node_name and p.status.phase == "Running" for p in pods)

            wait_until("2 operator pods Running on KWOK nodes", scheduled, timeout=60)
            # The cluster serves monitoring.coreos.com/v1: helm rendered the monitors, not annotations.
            for plural in ("servicemonitors", "podmonitors"):
                assert custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, plural)["items"]
            assert json.loads(rbac.read_cluster_role("dlmctl-chart-operator", _preload_content=False).data)[
                "rules"] == manifests.CLUSTER_ROLE_RULES

            # The operator as the Deployment's container would run it: its environment, and the Secret's keys.
            (c,) = deployment.spec.template.spec.containers
            env = {e.name: e.value for e in c.env if e.value is not None}
            secret = core.read_namespaced_secret(c.env_from[0].secret_ref.name, namespace)
            env |= {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
            kubeconfig = cluster.kubeconfig_for(deployment.spec.template.spec.service_account_name, namespace,
                                                create=False)
            operator = OperatorProcess(kubeconfig, tmp_path / "operator.log", env=env).start()
            try:
                experiments = Experiments(api, namespace)
                experiments.create("charted", spec(arms=["diffusion"]))
                (job,) = wait_until("the run's PyTorchJob", lambda: experiments.jobs("charted"),
                                    check=operator.check_alive)
                assert job["metadata"]["name"] == "charted-dlm"
                experiments.wait_run("charted", "charted-dlm", "Running", check=operator.check_alive)
                # Deleted while the operator runs, so it removes its finalizer and the namespace can go.
                custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "charted")
                wait_until("the Experiment deleted", lambda: not custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL)["items"], timeout=30, check=operator.check_alive)
            finally:
                operator.stop()
    finally:
        uninstalled = helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s",
                               kubeconfig=cluster.kubeconfig, check=False)
    assert uninstalled.returncode == 0, uninstalled.stderr
    with cluster.api_client() as api:
        def gone(read, *args) -> bool:
            try:
                read(*args)
            except ApiException as err:
                return err.status == 404
            return False

        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        rbac, custom = client.RbacAuthorizationV1Api(api), client.CustomObjectsApi(api)
        for read, *args in [
            (apps.read_namespaced_deployment, "dlmctl-chart-operator", namespace),
            (core.read_namespaced_service, "dlmctl-chart-operator", namespace),
            (core.read_namespaced_service_account, "dlmctl-chart-operator", namespace),
            (core.read_namespaced_secret, "dlmctl-chart-s3-credentials", namespace),
            (rbac.read_cluster_role, "dlmctl-chart-operator"),
            (rbac.read_cluster_role_binding, "dlmctl-chart-operator"),
            # and the API service's (tests/test_chart_service.py runs it)
            (apps.read_namespaced_deployment, "dlmctl-chart-service", namespace),
            (core.read_namespaced_service, "dlmctl-chart-service", namespace),
            (core.read_namespaced_service_account, "dlmctl-chart-service", namespace),
            (rbac.read_cluster_role, "dlmctl-chart-service"),
            (rbac.read_cluster_role_binding, "dlmctl-chart-service"),
            (custom.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", "dlmctl-chart"),
            (custom.get_namespaced_custom_object, "monitoring.coreos.com", "v1", namespace, "servicemonitors",
             "dlmctl-chart-operator"),
        ]:
            assert gone(read, *args), f"{args} left after helm uninstall"
        assert not core.list_namespaced_config_map(namespace, label_selector="grafana_dashboard=1").items
        # Helm never deletes the CRDs of crds/: Experiments outlive a release.
        client.ApiextensionsV1Api(api).read_custom_resource_definition("experiments.dlmctl.io")
    assert helm.run("list", "--namespace", namespace, "-q", kubeconfig=cluster.kubeconfig).stdout.strip() == ""
