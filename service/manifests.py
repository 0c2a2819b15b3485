"""The API service's own RBAC, as data: the Helm chart templates exactly `CLUSTER_ROLE_RULES`, and the tests
run the service with a token bound to exactly them.

The service needs no right on Experiments or pods itself: it checks who calls (TokenReview), whether they
may (SubjectAccessReview), and then acts *as them* (impersonation), so the API server applies the caller's
RBAC to every request. Impersonation cannot be limited by `resourceNames` here: the names would be every
user, group, ServiceAccount, uid and extra value of every caller, which no fixed list knows. Nor can the
`userextras` rule name its keys: an extra's key is the RBAC subresource (`userextras/<key>`), RBAC matches
no `userextras/*` wildcard, and authenticators choose their own keys; `*` in authentication.k8s.io covers
exactly `uids` and `userextras/<any key>` -- the only resources of that group with the verb impersonate.
Whoever holds this role's token can act as anyone: keep the service's ServiceAccount token to the service.
"""
from __future__ import annotations

from typing import Any

from dlmctl.operator import manifests as operator_manifests

NAME = "dlmctl-service"

CLUSTER_ROLE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"], "verbs": ["impersonate"]},
    {"apiGroups": ["authentication.k8s.io"], "resources": ["*"], "verbs": ["impersonate"]},
]


def cluster_role() -> dict[str, Any]:
    return operator_manifests.cluster_role(NAME, CLUSTER_ROLE_RULES)


def cluster_role_binding(namespace: str, service_account: str = NAME) -> dict[str, Any]:
    return operator_manifests.cluster_role_binding(namespace, service_account, name=NAME)
