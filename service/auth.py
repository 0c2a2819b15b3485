"""Who is calling, and may they: the bearer token is checked with a TokenReview and each action with a
SubjectAccessReview, both sent with the service's own credentials to the API server.

Caching: an answer is reused for `auth_cache_seconds` (5 s by default) in this process only, keyed by the
token's SHA-256 (never the token) and by the exact user and question; a lost cache costs one more review.
A revoked token or RoleBinding therefore works for at most those seconds here -- and not even then for
what the request does: the cluster is called as the caller (impersonation), so its RBAC is checked again.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

from dlmctl.spec import GROUP, PLURAL

from .cluster import Caller, caller_from_review

MAX_CACHED = 4096


class Unauthenticated(Exception):
    """No bearer token, or one the API server does not accept (401)."""


class Denied(Exception):
    """The caller may not do this (403); the message names the verb, resource and namespace."""


class ReviewFailed(Exception):
    """The API server could not be asked (503)."""


@dataclass(frozen=True)
class Action:
    verb: str
    namespace: str
    resource: str = PLURAL
    group: str = GROUP
    subresource: str = ""
    name: str = ""

    def words(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {what}{'.' + self.group if self.group else ''} in namespace {self.namespace!r}"


class TtlCache:
    """At most MAX_CACHED answers, each for `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self._items, self._lock = seconds, {}, threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if self.seconds <= 0:
            return compute()
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._items) >= MAX_CACHED:
                self._items = {k: v for k, v in self._items.items() if v[0] > now}
                if len(self._items) >= MAX_CACHED:
                    self._items.clear()
            self._items[key] = (now + self.seconds, value)
        return value


class Authorizer:
    def __init__(self, api, cache_seconds: float = 5.0):
        from kubernetes import client

        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)
        self._tokens = TtlCache(cache_seconds)
        self._decisions = TtlCache(cache_seconds)

    def authenticate(self, authorization: Optional[str]) -> Caller:
        """The caller of an `Authorization: Bearer <token>` header."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("a bearer token is required (Authorization: Bearer <token>)")
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        caller = self._tokens.get(key, lambda: self._review_token(token))
        if caller is None:
            raise Unauthenticated("the token is not valid (expired, revoked or unknown to the cluster)")
        return caller

    def _review_token(self, token: str) -> Optional[Caller]:
        from kubernetes import client

        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        status = self._ask(lambda: self._authn.create_token_review(review, _request_timeout=(5, 10))).status
        if not status.authenticated or status.user is None or not status.user.username:
            return None
        return caller_from_review(status.user)

    def authorize(self, caller: Caller, *actions: Action) -> None:
        for action in actions:
            key = (caller, action)
            if not self._decisions.get(key, lambda: self._review_access(caller, action)):
                raise Denied(f"{caller.username} may not {action.words()}")

    def _review_access(self, caller: Caller, action: Action) -> bool:
        from kubernetes import client

        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=caller.username, groups=list(caller.groups), uid=caller.uid or None,
            extra={k: list(v) for k, v in caller.extra} or None,
            resource_attributes=client.V1ResourceAttributes(
                verb=action.verb, group=action.group, resource=action.resource, namespace=action.namespace,
                subresource=action.subresource or None, name=action.name or None)))
        return bool(self._ask(lambda: self._authz.create_subject_access_review(review, _request_timeout=(5, 10)))
                    .status.allowed)

    @staticmethod
    def _ask(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as err:
            status = getattr(err, "status", None)
            raise ReviewFailed(f"the Kubernetes API server could not review the request"
                               f"{f' ({status})' if status else ''}") from None
