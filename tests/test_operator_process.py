"""The operator as a process: killed mid-reconcile it creates no duplicates when restarted, two replicas
elect one active and hand over when it dies, and its ServiceAccount holds only what its role grants."""
from __future__ import annotations

import time

import pytest
from kubernetes import client
import yaml

from dlmctl.operator import manifests
from operator_harness import Experiments, OperatorProcess, install_operator_rbac, wait_until
from test_operator import spec

pytestmark = pytest.mark.cluster


def test_an_operator_killed_mid_reconcile_and_restarted_creates_no_duplicates(cluster, cluster_namespace,
                                                                              s3_server, tmp_path):
    kubeconfig = install_operator_rbac(cluster)
    with cluster.api_client() as api:
        experiments = Experiments(api, cluster_namespace)
        experiments.create("many", spec(arms=["diffusion", "autoregressive"], resources={"gpus_per_node": 0},
                                        sweep={"data.epochs": list(range(1, 16))}))
        first = OperatorProcess(kubeconfig, tmp_path / "first.log", env=s3_server.env()).start()
        wait_until("the first jobs", lambda: experiments.jobs("many"), interval=0.05, check=first.check_alive)
        first.kill()  # SIGKILL in the middle of creating 30 jobs
        seen = {j["metadata"]["name"]: j["metadata"]["uid"] for j in experiments.jobs("many")}
        assert 0 < len(seen) < 30, f"{len(seen)} jobs when killed: the test needs a kill mid-way"
        second = OperatorProcess(kubeconfig, tmp_path / "second.log", env=s3_server.env()).start()
        try:
            jobs = wait_until("30 jobs", lambda: (j if len(j := experiments.jobs("many")) == 30 else None),
                              check=second.check_alive)
            time.sleep(2)
            assert len(experiments.jobs("many")) == 30
            for job in jobs:  # the jobs made before the kill were kept, not made again
                if job["metadata"]["name"] in seen:
                    assert job["metadata"]["uid"] == seen[job["metadata"]["name"]]
            assert second.metric("dlm_operator_jobs_created_total") == 30 - len(seen)
        finally:
            second.stop()


def test_two_replicas_elect_one_active_and_the_other_takes_over(cluster, cluster_namespace, s3_server, tmp_path):
    kubeconfig = install_operator_rbac(cluster)
    replicas = [OperatorProcess(kubeconfig, tmp_path / f"replica-{i}.log", env=s3_server.env()).start()
                for i in range(2)]
    try:
        with cluster.api_client() as api:
            experiments = Experiments(api, cluster_namespace)
            time.sleep(3)  # the replicas see each other's heartbeat and one pauses
            experiments.create("ha", spec(arms=["diffusion"], sweep={"data.epochs": [1, 2, 3, 4]}))
            wait_until("4 jobs", lambda: len(experiments.jobs("ha")) == 4)
            time.sleep(2)
            created = [r.metric("dlm_operator_jobs_created_total") for r in replicas]
            assert sorted(created) == [0, 4], f"one replica did all the work: {created}"
            active = replicas[created.index(4)]
            standby = replicas[created.index(0)]
            active.kill()  # no goodbye: the standby waits for the active one's heartbeat to expire
            experiments.create("ha2", spec(arms=["diffusion"]))
            wait_until("the standby creates the new job", lambda: experiments.jobs("ha2"), timeout=60,
                       check=standby.check_alive)
            # the counter goes up when the create call returns, a moment after the job is visible
            wait_until("the standby to count the job it created",
                       lambda: standby.metric("dlm_operator_jobs_created_total") == 1, timeout=10)
            time.sleep(1)  # and it stays 1: the standby created the job once
            assert standby.metric("dlm_operator_jobs_created_total") == 1
    finally:
        for r in replicas:
            r.stop()


def test_the_operator_role_grants_nothing_beyond_what_it_uses(cluster):
    kubeconfig = install_operator_rbac(cluster)
    with cluster.api_client(kubeconfig) as api:
        authz = client.AuthorizationV1Api(api)

        def allowed(verb, resource, group="", namespace="default", subresource=None):
            review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb, resource=resource, group=group, namespace=namespace, subresource=subresource)))
            return authz.create_self_subject_access_review(review).status.allowed

        granted = {(rule["apiGroups"][0], resource, verb) for rule in manifests.CLUSTER_ROLE_RULES
                   for resource in rule["resources"] for verb in rule["verbs"]}
        for group, resource, verb in granted:
            name, _, sub = resource.partition("/")
            assert allowed(verb, name, group, subresource=sub or None), (group, resource, verb)
        for verb, resource, group in [("get", "secrets", ""), ("list", "secrets", ""), ("create", "pods", ""),
                                      ("delete", "pods", ""), ("delete", "jobs", "batch"), ("delete", "experiments", "dlmctl.io"),
                                      ("create", "experiments", "dlmctl.io"), ("update", "pytorchjobs", "kubeflow.org"),
                                      ("list", "nodes", ""), ("create", "clusterroles", "rbac.authorization.k8s.io")]:
            assert not allowed(verb, resource, group), f"the operator may {verb} {resource}"


def test_the_install_manifests_are_accepted_by_the_api_server(cluster, tmp_path):
    """What `python -m dlmctl.operator manifests` prints, applied as a user would (server-side dry run)."""
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "-m", "dlmctl.operator", "manifests"], check=True,
                             capture_output=True, text=True).stdout
    documents = [d for d in yaml.safe_load_all(printed) if d]
    assert [d["kind"] for d in documents] == ["CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole",
                                              "ClusterRoleBinding", "ClusterKopfPeering", "Deployment"]
    (role,) = [d for d in documents if d["kind"] == "ClusterRole"]
    assert role["rules"] == manifests.CLUSTER_ROLE_RULES, "the role the tests prove is the one installed"
    kubectl = [str(cluster.binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig)]
    subprocess.run([*kubectl, "create", "namespace", "dlmctl-system"], capture_output=True)  # may exist already
    done = subprocess.run([*kubectl, "apply", "--server-side", "--dry-run=server", "-f", "-"], input=printed,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(server dry run)") == len(documents), done.stdout
