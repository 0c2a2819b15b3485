"""The service's way into the cluster: its own credentials (for TokenReview, SubjectAccessReview and
/readyz), and per request an `ApiClient` that impersonates the caller -- `Impersonate-User`, `-Group`,
`-Uid` and `Impersonate-Extra-<key>` headers -- so that the API server's RBAC decides what the caller may
do. Every client shares one urllib3 connection pool; nothing about a caller outlives its request."""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from dlmctl.spec.settings import ServiceSettings

IMPERSONATE_USER = "Impersonate-User"
IMPERSONATE_GROUP = "Impersonate-Group"
IMPERSONATE_UID = "Impersonate-Uid"
IMPERSONATE_EXTRA = "Impersonate-Extra-"
# Characters of an extra's key that may stand in a header name as they are; others are %-escaped (the API
# server unescapes them, as client-go escapes them).
_HEADER_KEY_SAFE = "!#$&'*+-.^_`|~"


@dataclass(frozen=True)
class Caller:
    """Who a bearer token belongs to, as the API server's TokenReview says."""
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def headers(self) -> dict[str, Any]:
        """The impersonation headers; a list value is sent as one header line per item."""
        headers: dict[str, Any] = {IMPERSONATE_USER: self.username}
        if self.groups:
            headers[IMPERSONATE_GROUP] = list(self.groups)
        if self.uid:
            headers[IMPERSONATE_UID] = self.uid
        for key, values in self.extra:
            # the key %-escaped, the values as they are (as client-go sends them)
            headers[IMPERSONATE_EXTRA + quote(key, safe=_HEADER_KEY_SAFE)] = list(values)
        return headers


class _MultiValuePool:
    """The shared urllib3 PoolManager, sending a header whose value is a list as one line per item (the
    kubernetes client keeps headers in a dict; the API server reads repeated Impersonate-Group lines)."""

    def __init__(self, pool):
        self._pool = pool

    def request(self, method, url, headers=None, **kwargs):
        import urllib3

        if headers and any(isinstance(v, list) for v in headers.values()):
            multi = urllib3.HTTPHeaderDict()
            for key, value in headers.items():
                for item in (value if isinstance(value, list) else [value]):
                    multi.add(key, item)
            headers = multi
        return self._pool.request(method, url, headers=headers, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pool, name)


class Cluster:
    def __init__(self, settings: ServiceSettings):
        from kubernetes import client, config

        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry warnings are not ours
        configuration = client.Configuration()
        if settings.kubeconfig:
            config.load_kube_config(config_file=os.path.expanduser(settings.kubeconfig), context=settings.context,
                                    client_configuration=configuration, persist_config=False)
        else:
            config.load_incluster_config(client_configuration=configuration)
        configuration.retries = 1
        configuration.connection_pool_maxsize = 64  # connections kept per host, shared by concurrent requests
        self.configuration = configuration
        self.server = configuration.host
        self._own = client.ApiClient(configuration)
        self._pool = _MultiValuePool(self._own.rest_client.pool_manager)
        self._own.rest_client.pool_manager = self._pool

    def service_client(self):
        """The service's own ApiClient (its ServiceAccount's rights: service/manifests.py)."""
        return self._own

    def client_for(self, caller: Caller):
        """An ApiClient that acts as `caller`, over the shared connection pool: a shallow copy of the service's
        own (its configuration and REST client shared, nothing built per request) with headers of its own."""
        api = copy.copy(self._own)
        api.default_headers = {**self._own.default_headers, **caller.headers()}
        return api

    def close(self) -> None:
        self._pool.clear()


def caller_from_review(user: Any) -> Caller:
    """A Caller from a TokenReview's status.user (its JSON as a dict, or a V1UserInfo)."""
    field_of = user.get if isinstance(user, dict) else lambda name: getattr(user, name, None)
    extra = tuple(sorted((k, tuple(v or ())) for k, v in (field_of("extra") or {}).items()))
    return Caller(username=field_of("username") or "", uid=field_of("uid") or "",
                  groups=tuple(field_of("groups") or ()), extra=extra)

