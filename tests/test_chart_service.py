"""The API service in the Helm chart (charts/dlmctl, `service.*`): `helm template` renders its Deployment (the one
image, non-root, probes on /readyz and /healthz, its settings as DLMCTL_SERVICE_* environment), Service, optional
Ingress, own ServiceAccount and a ClusterRole of exactly the rules the service uses; metrics like the operator's;
`service.enabled=false` leaves only the operator; wrong values fail naming the field; the API server accepts every
object. On the test cluster `helm install` schedules its replicas on KWOK nodes, and, since KWOK runs no containers,
two real service processes with the chart's ServiceAccount token and the Deployment's environment stand in for them:
whatever one replica is asked, the other answers the same, and a restarted replica has lost nothing."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from dlmctl.service import manifests as service_manifests
from dlmctl.spec.settings import ServiceSettings
from dlmctl.spec import GROUP, VERSION
from test_chart import CHART, NON_DEFAULT, Helm, container, helm, kubectl, monitoring_api, one, plain_env  # noqa: F401

# Settings the chart sets itself: where it listens, the body limit (service.maxBodyBytes), in-cluster credentials.
CHART_MANAGED_SETTINGS = {"host", "port", "max_body_bytes", "kubeconfig", "context"}
SERVICE_KINDS = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]

SERVICE_VALUES = {
    "replicas": 3,
    "containerPort": 8081,
    "port": 8443,
    "type": "LoadBalancer",
    "maxBodyBytes": 4 * 1024 * 1024,
    "settings": {"log_level": "debug"},
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"}],
    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
    "nodeSelector": {"node-role.kubernetes.io/system": "true"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
            "matchLabels": {"app.kubernetes.io/component": "service"}}}}]}},
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"team": "research"},
    "podLabels": {"cost-center": "ml"},
    "serviceAccount": {"name": "dlmctl-api", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "ingress": {"enabled": True, "className": "nginx", "host": "dlmctl.example.com", "path": "/",
                "tls": {"secretName": "dlmctl-example-tls"},
                "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "4m"}},
}


def service_objects(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "service"]


def notes(helm: Helm, values: dict | None = None) -> str:
    done = helm.run("install", "dlmctl", CHART, "--dry-run=client", "--namespace", "dlmctl-system",
                    "-f", helm.values_file(values or {}))
    return done.stdout.split("NOTES:", 1)[1]


# ---- helm template ------------------------------------------------------------------------------------------------

def test_the_service_by_default(helm):
    objects = helm.template(namespace="dlmctl-system")
    assert sorted(o["kind"] for o in service_objects(objects)) == sorted(SERVICE_KINDS)
    assert not [o for o in objects if o["kind"] == "Ingress"]

    role, binding = one(objects, "ClusterRole", "service"), one(objects, "ClusterRoleBinding", "service")
    assert role["rules"] == service_manifests.CLUSTER_ROLE_RULES, "exactly the rules the service uses"
    assert role["metadata"]["name"] == binding["roleRef"]["name"] == "dlmctl-service"
    sa = one(objects, "ServiceAccount", "service")
    assert sa["metadata"]["name"] == "dlmctl-service" != one(objects, "ServiceAccount", "operator")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dlmctl-service", "namespace": "dlmctl-system"}]

    deployment, operator = one(objects, "Deployment", "service"), one(objects, "Deployment", "operator")
    pod, operator_pod = deployment["spec"]["template"]["spec"], operator["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "dlmctl-service"
    assert pod["securityContext"] == operator_pod["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000,
                                                                         "fsGroup": 1000}
    c, operator_c = container(objects, "service"), container(objects, "operator")
    assert c["command"] == ["python", "-m", "dlmctl.service"]
    assert (c["image"], c["imagePullPolicy"]) == (operator_c["image"], operator_c["imagePullPolicy"]), "one image"
    assert c["securityContext"] == operator_c["securityContext"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "192Mi"}, "limits": {"memory": "512Mi"}}
    env = plain_env(c)
    assert {k: v for k, v in env.items() if k.startswith("DLMCTL_SERVICE_")} == {
        "DLMCTL_SERVICE_HOST": "0.0.0.0", "DLMCTL_SERVICE_PORT": "8000", "DLMCTL_SERVICE_MAX_BODY_BYTES": "1048576"}
    assert c["envFrom"] == operator_c["envFrom"], "compare reads runs' progress from the stores as the operator does"
    assert not any(k in pod for k in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"))

    service = one(objects, "Service", "service")
    assert service["metadata"]["name"] == "dlmctl-service" and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert not service["spec"]["selector"].items() <= operator["spec"]["template"]["metadata"]["labels"].items(), \
        "the operator's pods are not behind the API's Service"


def test_service_disabled_leaves_the_operator_alone(helm):
    on, off = helm.template(), helm.template({"service": {"enabled": False, "ingress": {"enabled": True}}})
    assert not service_objects(off)
    assert off == [o for o in on if o not in service_objects(on)]
    assert not [o for o in helm.template({"service": {"enabled": False}, "monitoring": {"mode": "prometheus-operator"}})
                if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "dlmctl-service"]
    assert "API service" not in notes(helm, {"service": {"enabled": False}})


def test_non_default_values_reach_the_service(helm):
    objects = helm.template({**NON_DEFAULT, "service": SERVICE_VALUES})
    deployment = one(objects, "Deployment", "service")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert (pod["nodeSelector"], pod["tolerations"], pod["affinity"]) == (
        SERVICE_VALUES["nodeSelector"], SERVICE_VALUES["tolerations"], SERVICE_VALUES["affinity"])
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert template["metadata"]["labels"]["cost-center"] == "ml" and template["metadata"]["annotations"]["team"] == \
        "research"
    assert "checksum/s3-credentials" in template["metadata"]["annotations"], "restarted when the credentials change"
    c = container(objects, "service")
    assert (c["image"], c["imagePullPolicy"]) == ("registry.example.com/ml/dlmctl:0.1.0-rc1", "Always")
    assert c["resources"] == SERVICE_VALUES["resources"]
    assert c["ports"] == [{"name": "http", "containerPort": 8081}]
    env = plain_env(c)
    assert env["DLMCTL_SERVICE_PORT"] == "8081" and env["DLMCTL_SERVICE_MAX_BODY_BYTES"] == "4194304"
    assert env["DLMCTL_SERVICE_LOG_LEVEL"] == "debug" and env["HTTPS_PROXY"] == "http://proxy.example.com:3128"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-central-1"
    secret = one(objects, "Secret")
    assert c["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"], "optional": False}}]

    sa = one(objects, "ServiceAccount", "service")
    assert sa["metadata"]["name"] == pod["serviceAccountName"] == "dlmctl-api"
    assert sa["metadata"]["annotations"] == SERVICE_VALUES["serviceAccount"]["annotations"]
    assert one(objects, "ClusterRoleBinding", "service")["subjects"][0]["name"] == "dlmctl-api"
    service = one(objects, "Service", "service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8443, "targetPort": "http", "protocol": "TCP"}]

    unmanaged = helm.template({"service": {"serviceAccount": {"create": False, "name": "team-api"}},
                               "rbac": {"create": False}})
    assert {o["kind"] for o in service_objects(unmanaged)} == {"Deployment", "Service"}
    assert one(unmanaged, "Deployment", "service")["spec"]["template"]["spec"]["serviceAccountName"] == "team-api"


def test_the_service_settings_are_the_services_and_reach_it_as_environment(helm, monkeypatch):
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["properties"]["service"]["properties"]["settings"]["properties"]
    model = ServiceSettings.model_json_schema()["properties"]
    assert set(settings) == set(model) - CHART_MANAGED_SETTINGS
    for name, rule in settings.items():
        assert rule == {k: v for k, v in model[name].items() if k not in ("title", "default", "description")}, name

    values = {"service": {"settings": {"log_level": "debug", "auth_cache_seconds": 0}, "containerPort": 9000,
                          "maxBodyBytes": 2048}}
    for name in [n for n in os.environ if n.startswith("DLMCTL_SERVICE_")]:
        monkeypatch.delenv(name)
    for name, value in plain_env(container(helm.template(values), "service")).items():
        monkeypatch.setenv(name, value)
    loaded = ServiceSettings()
    assert loaded.model_dump() == {**ServiceSettings.model_construct().model_dump(), "host": "0.0.0.0", "port": 9000,
                                   "max_body_bytes": 2048, "log_level": "debug", "auth_cache_seconds": 0}
    assert not loaded.kubeconfig, "in-cluster credentials: the pod's ServiceAccount token"


def test_the_ingress_routes_to_the_services_http_port(helm):
    objects = helm.template({"service": SERVICE_VALUES})
    ingress, service = one(objects, "Ingress", "service"), one(objects, "Service", "service")
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-body-size": "4m"}
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "dlmctl-example-tls", "hosts": ["dlmctl.example.com"]}]
    (rule,) = spec["rules"]
    assert rule["host"] == "dlmctl.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert path["backend"] == {"service": {"name": service["metadata"]["name"], "port": {"name": "http"}}}
    assert "https://dlmctl.example.com" in notes(helm, {"service": SERVICE_VALUES})

    plain = one(helm.template({"service": {"ingress": {"enabled": True}}}), "Ingress", "service")
    assert "tls" not in plain["spec"] and "ingressClassName" not in plain["spec"] and "annotations" not in plain[
        "metadata"]
    assert "host" not in plain["spec"]["rules"][0], "every host"


def test_the_service_is_scraped_like_the_operator(helm):
    def monitors(values=None, **kw) -> tuple[dict | None, dict]:
        objects = helm.template(values, **kw)
        found = [o for o in objects if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "dlmctl-service"]
        return (found[0] if found else None), objects

    monitor, objects = monitors(api_versions=("monitoring.coreos.com/v1",))
    service = one(objects, "Service", "service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert "annotations" not in service["metadata"]
    assert "annotations" not in one(objects, "Deployment", "service")["spec"]["template"]["metadata"]
    labelled, _ = monitors(NON_DEFAULT)
    assert labelled["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert labelled["spec"]["endpoints"][0]["interval"] == "15s"

    # No prometheus-operator (or mode annotations): Prometheus finds the pods and the Service by annotations.
    for kw in ({}, {"values": {"monitoring": {"mode": "annotations"}}, "api_versions": ("monitoring.coreos.com/v1",)}):
        monitor, objects = monitors(**kw)
        assert monitor is None
        scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
        assert one(objects, "Deployment", "service")["spec"]["template"]["metadata"]["annotations"] == scrape
        assert one(objects, "Service", "service")["metadata"]["annotations"] == scrape, "the endpoints' port"


def test_the_notes_give_the_url_and_the_cli_context(helm):
    text = notes(helm)
    assert "http://dlmctl-service.dlmctl-system.svc" in text
    assert "kubectl -n dlmctl-system port-forward service/dlmctl-service 8000:80" in text
    assert "dlmctl config set-context dlmctl --backend service --server http://127.0.0.1:8000" in text
    assert 'curl -H "Authorization: Bearer $DLMCTL_TOKEN" http://127.0.0.1:8000/v1/namespaces/' in text


@pytest.mark.parametrize("values, field", [
    ({"service": {"enabled": "yes"}}, "at '/service/enabled': got string, want boolean"),
    ({"service": {"replicas": -1}}, "at '/service/replicas'"),
    ({"service": {"replica": 2}}, "at '/service': additional properties 'replica' not allowed"),
    ({"service": {"port": 0}}, "at '/service/port'"),
    ({"service": {"containerPort": 70000}}, "at '/service/containerPort'"),
    ({"service": {"type": "ExternalName"}}, "at '/service/type'"),
    ({"service": {"maxBodyBytes": "1Mi"}}, "at '/service/maxBodyBytes'"),
    ({"service": {"maxBodyBytes": 0}}, "at '/service/maxBodyBytes'"),
    ({"service": {"settings": {"port": 9000}}}, "at '/service/settings': additional properties 'port'"),
    ({"service": {"resources": {"limits": {"memory": "lots"}}}}, "at '/service/resources/limits/memory'"),
    ({"service": {"tolerations": [{"effect": "Sometimes"}]}}, "at '/service/tolerations/0/effect'"),
    ({"service": {"ingress": {"enabled": True, "host": "https://dlmctl.example.com"}}}, "at '/service/ingress/host'"),
    ({"service": {"ingress": {"path": "v1"}}}, "at '/service/ingress/path'"),
    ({"service": {"ingress": {"tls": "dlmctl-tls"}}}, "at '/service/ingress/tls'"),
    ({"service": {"ingress": {"tls": {"secretName": "Bad_Name"}}}}, "at '/service/ingress/tls/secretName'"),
    ({"service": {"serviceAccount": {"create": False}}},
     "service.serviceAccount.name: required when service.serviceAccount.create is false"),
], ids=["enabled-a-string", "replicas-negative", "unknown-key", "port-zero", "container-port-too-big",
        "service-type", "body-size-a-quantity", "body-size-zero", "chart-managed-setting", "memory-limit",
        "toleration-effect", "ingress-host-a-url", "ingress-path-relative", "tls-a-string", "tls-secret-name",
        "service-account-unnamed"])
def test_wrong_service_values_fail_naming_the_field(helm, values, field):
    assert field in helm.refused(values)


# ---- on the test cluster -------------------------------------------------------------------------------------------

@pytest.mark.cluster
def test_the_api_server_accepts_every_service_object(helm, cluster, cluster_namespace, monitoring_api):
    for values in ({"service": SERVICE_VALUES}, {"service": {**SERVICE_VALUES, "ingress": {"enabled": True}}}):
        text = helm.template_text(values, namespace=cluster_namespace, release="dlmctl-svc-dry-run",
                                  api_versions=("monitoring.coreos.com/v1",))
        documents = service_objects([d for d in yaml.safe_load_all(text) if d])
        out = kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--dry-run=server",
                      "--field-manager=test-chart", "-f", "-", stdin=yaml.safe_dump_all(documents))
        accepted = [line for line in out.splitlines() if line.endswith("serverside-applied (server dry run)")]
        assert len(accepted) == len(documents), out
        assert {d["kind"] for d in documents} == set(SERVICE_KINDS) | {"Ingress", "ServiceMonitor"}


@pytest.mark.cluster
def test_helm_install_schedules_two_replicas_that_stay_consistent(helm, cluster, cluster_namespace, tmp_path):
    """KWOK runs no containers: the two pods are scheduled, and two real processes with the chart's ServiceAccount
    token and the Deployment's environment answer for them. Whatever one is asked, the other answers the same."""
    import httpx
    from kubernetes import client

    from operator_harness import wait_until
    from service_harness import ServiceProcess, grant_experiments
    from test_operator import spec

    release, namespace = "dlmctl-replicas", cluster_namespace
    helm.run("install", release, CHART, "--namespace", namespace, "-f", helm.values_file({}),
             kubeconfig=cluster.kubeconfig)
    replicas: list[ServiceProcess] = []
    try:
        with cluster.api_client() as api:
            apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
            deployment = apps.read_namespaced_deployment(f"{release}-service", namespace)
            selector = ",".join(f"{k}={v}" for k, v in deployment.spec.selector.match_labels.items())

            def scheduled() -> bool:
                pods = core.list_namespaced_pod(namespace, label_selector=selector).items
                return len(pods) == 2 and all(p.spec.node_name in cluster.nodes and p.status.phase == "Running"
                                              for p in pods)

            wait_until("2 service pods Running on KWOK nodes", scheduled, timeout=60)
        (c,) = deployment.spec.template.spec.containers
        env = {e.name: e.value for e in c.env if e.value is not None}  # the chart's settings, less where it listens
        kubeconfig = cluster.kubeconfig_for(deployment.spec.template.spec.service_account_name, namespace,
                                            create=False)
        replicas = [ServiceProcess(kubeconfig, tmp_path / f"replica-{i}.log", env=env).start() for i in range(2)]
        auth = {"Authorization": f"Bearer {grant_experiments(cluster, namespace)}"}
        path = f"/v1/namespaces/{namespace}/experiments"
        a, b = (httpx.Client(base_url=r.url, headers=auth, timeout=30) for r in replicas)

        def agree(request_path: str) -> dict:
            """Both replicas answer the same (200) to this GET."""
            answers = [x.get(request_path) for x in (a, b)]
            assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
            assert answers[0].json() == answers[1].json()
            return answers[0].json()

        def names() -> list[str]:
            return sorted(item["name"] for item in agree(path)["items"])

        document = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Experiment", "metadata": {"name": "first"},
                    "spec": spec(arms=["diffusion"])}
        created = a.post(path, json=document)
        assert created.status_code == 201, created.text
        assert agree(f"{path}/first")["spec"] == created.json()["spec"]
        assert b.post(path, json=document).status_code == 409, "the other replica knows it exists"
        second = {**document, "metadata": {"name": "second"}, "spec": spec(arms=["autoregressive"])}
        assert b.post(path, json=second).status_code == 201
        assert names() == ["first", "second"]

        replaced = a.post(path, params={"replace": "true"}, json={**document, "spec": spec(arms=["autoregressive"])})
        assert replaced.status_code == 201, replaced.text
        assert agree(f"{path}/first")["spec"] == replaced.json()["spec"] != created.json()["spec"]
        cancelled = b.post(f"{path}/second:cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"] == "second", cancelled.text
        agree(f"{path}/second")
        agree(f"{path}/first/compare")

        # A replica restarted (a new pod) has lost nothing: the state is the Experiments in the API server.
        before = {name: agree(f"{path}/{name}") for name in names()}
        replicas[0].stop()
        assert b.get(path).status_code == 200, "the other replica serves meanwhile"
        replicas[0] = ServiceProcess(kubeconfig, tmp_path / "replica-0-restarted.log", env=env).start()
        a.close()
        a = httpx.Client(base_url=replicas[0].url, headers=auth, timeout=30)
        assert {name: agree(f"{path}/{name}") for name in names()} == before

        deleted = a.delete(f"{path}/second")
        assert deleted.status_code == 200 and deleted.json() == {"deleted": "second"}
        listed = lambda x: sorted(item["name"] for item in x.get(path).json()["items"])  # noqa: E731
        wait_until("second gone from both replicas", lambda: listed(a) == listed(b) == ["first"], timeout=30)
        assert names() == ["first"]
        assert [x.get(f"{path}/second").status_code for x in (a, b)] == [404, 404]
        a.close()
        b.close()
    finally:
        for replica in replicas:
            replica.stop()
        uninstalled = helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s",
                               kubeconfig=cluster.kubeconfig, check=False)
    assert uninstalled.returncode == 0, uninstalled.stderr
