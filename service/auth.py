"""Who is calling, and may they: the bearer token is checked with a TokenReview and each action with a
SubjectAccessReview, both sent with the service's own credentials to the API server.

Caching: an answer is reused for `auth_cache_seconds` (5 s by default) in this process only, keyed by the
token's SHA-256 (never the token) and by the exact user and question (a question about one named object is
first asked for its whole namespace: Authorizer); a lost cache costs one more review.
A revoked token or RoleBinding therefore works for at most those seconds here -- and not even then for
what the request does: the cluster is called as the caller (impersonation), so its RBAC is checked again.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, replace
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

    def peek(self, key: Hashable, missing: Any = None) -> Any:
        """The answer while it is fresh, else `missing` (computes nothing: safe on the event loop)."""
        hit = self._items.get(key)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else missing

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


_MISSING = object()


class Authorizer:
    """The reviews are sent and read as plain JSON (no kubernetes model objects: they cost more CPU than the
    round trip here). A question about one object (get/delete/patch of a name) is first asked for the whole
    namespace: RBAC allows a verb on every name exactly when it allows it without a name, so one cached answer
    covers every object; only a "no" is asked again with the name (a Role may name single objects)."""

    def __init__(self, api, cache_seconds: float = 5.0):
        from kubernetes import client

        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)
        self._tokens = TtlCache(cache_seconds)
        self._decisions = TtlCache(cache_seconds)

    @staticmethod
    def _token_of(authorization: Optional[str]) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("a bearer token is required (Authorization: Bearer <token>)")
        return token

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()

    def authenticate(self, authorization: Optional[str]) -> Caller:
        """The caller of an `Authorization: Bearer <token>` header."""
        token = self._token_of(authorization)
        caller = self._tokens.get(self._key(token), lambda: self._review_token(token))
        return self._known(caller)

    def authenticated(self, authorization: Optional[str]) -> Optional[Caller]:
        """What `authenticate` answers, if that needs no review now (cached); None if it does."""
        token = self._token_of(authorization)
        caller = self._tokens.peek(self._key(token), _MISSING)
        return None if caller is _MISSING else self._known(caller)

    @staticmethod
    def _known(caller: Optional[Caller]) -> Caller:
        if caller is None:
            raise Unauthenticated("the token is not valid (expired, revoked or unknown to the cluster)")
        return caller

    def _review_token(self, token: str) -> Optional[Caller]:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        status = self._ask(self._authn.create_token_review, review).get("status") or {}
        user = status.get("user") or {}
        if not status.get("authenticated") or not user.get("username"):
            return None
        return caller_from_review(user)

    def authorize(self, caller: Caller, *actions: Action) -> None:
        for action in actions:
            if not self._allowed(caller, action):
                raise Denied(f"{caller.username} may not {action.words()}")

    def authorized(self, caller: Caller, *actions: Action) -> bool:
        """Whether every action is known (cached) to be allowed: False means "ask" (`authorize`), not "no"."""
        return all(self._decisions.peek((caller, a)) or (a.name and self._decisions.peek((caller, _unnamed(a))))
                   for a in actions)

    def _allowed(self, caller: Caller, action: Action) -> bool:
        if action.name and self._decide(caller, _unnamed(action)):
            return True
        return self._decide(caller, action)

    def _decide(self, caller: Caller, action: Action) -> bool:
        return self._decisions.get((caller, action), lambda: self._review_access(caller, action))

    def _review_access(self, caller: Caller, action: Action) -> bool:
        attributes = {"verb": action.verb, "group": action.group, "resource": action.resource,
                      "namespace": action.namespace}
        if action.subresource:
            attributes["subresource"] = action.subresource
        if action.name:
            attributes["name"] = action.name
        spec: dict[str, Any] = {"user": caller.username, "groups": list(caller.groups),
                                "resourceAttributes": attributes}
        if caller.uid:
            spec["uid"] = caller.uid
        if caller.extra:
            spec["extra"] = {k: list(v) for k, v in caller.extra}
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        return bool((self._ask(self._authz.create_subject_access_review, review).get("status") or {}).get("allowed"))

    @staticmethod
    def _ask(create: Callable[..., Any], review: dict) -> dict:
        """POST the review; its answer as a dict."""
        try:
            response = create(review, _request_timeout=(5, 10), _preload_content=False)
            answer = json.loads(response.data)
        except Exception as err:
            status = getattr(err, "status", None)
            raise ReviewFailed(f"the Kubernetes API server could not review the request"
                               f"{f' ({status})' if status else ''}") from None
        if not isinstance(answer, dict):
            raise ReviewFailed("the Kubernetes API server could not review the request")
        return answer


def _unnamed(action: Action) -> Action:
    return replace(action, name="")
