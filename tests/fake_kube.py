"""A small in-process Kubernetes API server on 127.0.0.1, for testing the controller's real HTTP calls.

It serves the REST paths the official ``kubernetes`` client uses for the kinds sdray touches: create, get,
list (label selectors), watch (from a resourceVersion, with ``410 Gone`` once that version is compacted
away), replace (optimistic concurrency on resourceVersion: 409 Conflict), merge-patch, the ``status``
subresource (status ignored on create and on main-resource writes; spec ignored on status writes; a
``generation`` that counts spec changes), delete with the garbage collector's cascade over
ownerReferences, 404 NotFound and 409 AlreadyExists. Pod logs come from ``set_pod_log``.

RBAC, for clients that send a ServiceAccount's bearer token (``token_for``): a request is allowed only by
a rule of a Role bound to that ServiceAccount in the request's namespace (apiGroups, resources with
``/status``, verbs, resourceNames; ``*``), else 403 Forbidden; writing a Role or RoleBinding that grants
more than the writer holds is refused as the API server's escalation check does (``bind``/``escalate``
verbs honoured). An unknown token gets 401. Requests without a token are the cluster admin's.

What it is not: no admission, no defaulting, no schema (tests validate what was stored against the real
schemas instead), no ClusterRoles, no finalizers; the cascade runs at once instead of in the background.
Test code drives the other operators (KubeRay setting a RayJob's status) through ``update_status``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# (group, version, plural) → (kind, has a status subresource)
RESOURCES = {
    ("", "v1", "configmaps"): ("ConfigMap", False),
    ("", "v1", "secrets"): ("Secret", False),
    ("", "v1", "events"): ("Event", False),
    ("events.k8s.io", "v1", "events"): ("Event", False),
    ("", "v1", "pods"): ("Pod", True),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", False),
    ("coordination.k8s.io", "v1", "leases"): ("Lease", False),
    ("rbac.authorization.k8s.io", "v1", "roles"): ("Role", False),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): ("RoleBinding", False),
    ("networking.k8s.io", "v1", "networkpolicies"): ("NetworkPolicy", False),
    ("sdray.io", "v1alpha1", "diffusionjobs"): ("DiffusionJob", True),
    ("ray.io", "v1", "rayjobs"): ("RayJob", True),
}
RBAC = "rbac.authorization.k8s.io"
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|log))?$"
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch (strategic merge patches are treated alike: enough for sdray's calls)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _selected(obj: dict, selector: str | None) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif term not in labels:
            return False
    return True


def _spec_part(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class FakeKube:
    """The server and its store; ``url`` is what ``Configuration.host`` takes."""

    def __init__(self, history: int = 10_000):
        self._lock = threading.Condition()
        self._store: dict[tuple, dict] = {}  # (group, plural, namespace, name) → object
        self._events: deque = deque(maxlen=history)  # (rv, type, group, plural, namespace, object)
        # A store is never at version 0, which watches take as "from any version" (all objects ADDED again).
        self._rv = itertools.count(2)
        self._last_rv = 1
        self._compacted = 0  # watches from a version below this get 410 Gone
        self._failures: list[dict] = []
        self._logs: dict[tuple, str] = {}
        self._tokens: dict[str, tuple[str, str]] = {}  # bearer token → (namespace, ServiceAccount)
        self.requests: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._stopped = False

    # -- life cycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- test-side helpers --------------------------------------------------------------------------
    def fail(self, method: str, plural: str, code: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` ``method`` requests on ``plural`` with ``code``."""
        with self._lock:
            self._failures.append({"method": method, "plural": plural, "code": code, "left": times})

    def compact(self) -> None:
        """Forget the watch history, as etcd compaction does: older resourceVersions get 410 Gone."""
        with self._lock:
            self._events.clear()
            self._compacted = self._last_rv + 1

    def objects(self, plural: str, namespace: str | None = None) -> list[dict]:
        """Stored objects of ``plural`` (``events.events.k8s.io``: of that group only)."""
        group, plural = self._split(plural)
        with self._lock:
            return [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self._store.items())
                    if p == plural and group in (None, g) and (namespace is None or ns == namespace)]

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        group, plural = self._split(plural)
        with self._lock:
            found = [o for (g, p, ns, n), o in self._store.items()
                     if (p, ns, n) == (plural, namespace, name) and group in (None, g)]
            return copy.deepcopy(found[0]) if found else None

    def update_status(self, plural: str, namespace: str, name: str, status: dict) -> dict:
        """Merge ``status`` into an object's status, as its operator would."""
        group = self._group_of(plural)
        with self._lock:
            return self._patch(group, plural, namespace, name, {"status": status}, "status")

    def delete(self, plural: str, namespace: str, name: str) -> None:
        with self._lock:
            self._delete(self._group_of(plural), plural, namespace, name)

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        with self._lock:
            self._logs[(namespace, name)] = text

    def token_for(self, namespace: str, service_account: str) -> str:
        """A bearer token that authenticates as ServiceAccount ``namespace/service_account`` (RBAC applies)."""
        token = uuid.uuid4().hex
        with self._lock:
            self._tokens[token] = (namespace, service_account)
        return token

    def allowed(self, user: tuple[str, str], verb: str, group: str, resource: str, namespace: str | None,
                name: str | None) -> bool:
        """Whether ServiceAccount ``user`` may ``verb`` ``resource`` (``plural`` or ``plural/sub``) named
        ``name`` (None: a collection, or a create) in ``namespace``, by the Roles bound to it there."""
        with self._lock:
            return any(_rule_allows(rule, verb, group, resource, name) for rule in self._rules_of(user, namespace))

    def _rules_of(self, user: tuple[str, str], namespace: str | None) -> list[dict]:
        subject = {"kind": "ServiceAccount", "name": user[1], "namespace": user[0]}
        rules = []
        for (g, p, ns, _), binding in self._store.items():
            if (g, p, ns) != (RBAC, "rolebindings", namespace) or binding["roleRef"].get("kind") != "Role":
                continue
            if any({k: s.get(k) for k in subject} == subject for s in binding.get("subjects") or []):
                role = self._store.get((RBAC, "roles", namespace, binding["roleRef"]["name"]))
                rules += (role or {}).get("rules") or []
        return rules

    def _authorize(self, user, method, group, plural, sub, namespace, name, query, body) -> None:
        if method == "GET":
            verb = "get" if name else "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
        else:
            verb = _VERBS[method]
        resource = f"{plural}/{sub}" if sub else plural
        who = f"system:serviceaccount:{user[0]}:{user[1]}"
        if not self.allowed(user, verb, group, resource, namespace, name):
            raise ApiError(403, "Forbidden", f'{resource}.{group} "{name or ""}" is forbidden: User "{who}" cannot '
                                             f'{verb} resource "{resource}" in API group "{group}" in the namespace '
                                             f'"{namespace}"')
        if group != RBAC or verb not in ("create", "update", "patch") or sub:
            return
        # The escalation check: a Role may hold, and a RoleBinding may grant, only what the writer holds.
        target = (body or {}).get("metadata", {}).get("name") or name
        if plural == "roles" and not self.allowed(user, "escalate", RBAC, "roles", namespace, target):
            granted = (body or {}).get("rules") or []
        elif plural == "rolebindings":
            ref = (body or {}).get("roleRef") or {}
            if self.allowed(user, "bind", RBAC, "roles", namespace, ref.get("name")):
                return
            granted = (self._store.get((RBAC, "roles", namespace, ref.get("name"))) or {}).get("rules") or []
        else:
            return
        for rule in granted:
            for g, res, verb_, rname in itertools.product(rule.get("apiGroups") or [], rule.get("resources") or [],
                                                          rule.get("verbs") or [], rule.get("resourceNames") or [None]):
                if not self.allowed(user, verb_, g, res, namespace, rname):
                    raise ApiError(403, "Forbidden", f'{plural}.{RBAC} "{target}" is forbidden: user "{who}" is '
                                                     "attempting to grant RBAC permissions not currently held: "
                                                     f"{verb_} {res}.{g} {rname or ''}")

    def created(self, plural: str, agent: str | None = None) -> list[dict]:
        """The successful create requests on ``plural`` (by client user agent when given)."""
        return [r for r in self.requests if r["method"] == "POST" and r["plural"] == plural
                and r["code"] == 201 and (agent is None or r["agent"] == agent)]

    def wait(self, predicate, timeout: float = 10.0, what: str = "a condition"):
        """Block until ``predicate()`` is truthy after some change to the store (or fail at the deadline)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._lock.wait(left)

    @staticmethod
    def _split(plural: str) -> tuple[str | None, str]:
        """``events.events.k8s.io`` → ("events.k8s.io", "events"), as kubectl names a resource of a group; a
        bare plural: (None, plural), any group."""
        name, dot, group = plural.partition(".")
        return (group, name) if dot else (None, plural)

    @classmethod
    def _group_of(cls, plural: str) -> str:
        group, plural = cls._split(plural)
        return group if group is not None else next(g for (g, _, p) in RESOURCES if p == plural)

    # -- the store ----------------------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _record(self, kind: str, group: str, plural: str, namespace: str, obj: dict) -> None:
        self._events.append((int(obj["metadata"]["resourceVersion"]), kind, group, plural, namespace,
                             copy.deepcopy(obj)))
        self._lock.notify_all()

    def _check_failure(self, method: str, plural: str) -> None:
        for f in self._failures:
            if f["method"] == method and f["plural"] == plural and f["left"] > 0:
                f["left"] -= 1
                raise ApiError(f["code"], "InternalError", f"injected failure of {method} {plural}")

    def _create(self, group: str, plural: str, namespace: str | None, body: dict) -> dict:
        kind, has_status = RESOURCES[(group, self._version(group, plural), plural)]
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{kind}: metadata.name: Required value")
        if meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the URL")
        key = (group, plural, namespace, meta["name"])
        if key in self._store:
            raise ApiError(409, "AlreadyExists", f'{plural}.{group} "{meta["name"]}" already exists')
        obj = copy.deepcopy(body)
        if has_status:
            obj.pop("status", None)
        obj["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                               resourceVersion=self._next_rv())
        self._store[key] = obj
        self._record("ADDED", group, plural, namespace, obj)
        return obj

    def _existing(self, group: str, plural: str, namespace: str | None, name: str) -> dict:
        try:
            return self._store[(group, plural, namespace, name)]
        except KeyError:
            raise ApiError(404, "NotFound", f'{plural}.{group} "{name}" not found') from None

    def _write(self, group, plural, namespace, name, new: dict, sub: str | None) -> dict:
        old = self._existing(group, plural, namespace, name)
        kind, has_status = RESOURCES[(group, self._version(group, plural), plural)]
        given = (new.get("metadata") or {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {plural}.{group} "{name}": the object '
                                            "has been modified; please apply your changes to the latest version")
        if sub == "status":
            obj = copy.deepcopy(old)
            if "status" in new:
                obj["status"] = new["status"]
        else:
            obj = copy.deepcopy(new)
            if has_status:
                obj["status"] = copy.deepcopy(old.get("status")) if "status" in old else obj.pop("status", None)
                if obj.get("status") is None:
                    obj.pop("status", None)
            meta = obj.setdefault("metadata", {})
            for fixed in ("uid", "creationTimestamp", "namespace", "name", "generation"):
                meta[fixed] = old["metadata"][fixed]
            if _spec_part(obj) != _spec_part(old):
                meta["generation"] = old["metadata"]["generation"] + 1
        if obj == old:
            return obj  # a no-op write keeps its resourceVersion and sends no event, as the API server
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._store[(group, plural, namespace, name)] = obj
        self._record("MODIFIED", group, plural, namespace, obj)
        return obj

    def _patch(self, group, plural, namespace, name, patch: dict, sub: str | None) -> dict:
        old = self._existing(group, plural, namespace, name)
        merged = _merge_patch(old, patch)
        merged["metadata"]["resourceVersion"] = (patch.get("metadata") or {}).get(
            "resourceVersion", old["metadata"]["resourceVersion"])
        return self._write(group, plural, namespace, name, merged, sub)

    def _delete(self, group, plural, namespace, name) -> dict:
        obj = self._existing(group, plural, namespace, name)
        del self._store[(group, plural, namespace, name)]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._record("DELETED", group, plural, namespace, gone)
        uid = obj["metadata"]["uid"]
        # The garbage collector: dependents whose owner is gone go too.
        for (g, p, ns, n), other in list(self._store.items()):
            owners = (other.get("metadata") or {}).get("ownerReferences") or []
            if ns == namespace and any(ref.get("uid") == uid for ref in owners) and (g, p, ns, n) in self._store:
                self._delete(g, p, ns, n)
        return gone

    @staticmethod
    def _version(group: str, plural: str) -> str:
        return next(v for (g, v, p) in RESOURCES if g == group and p == plural)

    def _list(self, group, plural, namespace, selector) -> dict:
        kind, _ = RESOURCES[(group, self._version(group, plural), plural)]
        items = [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self._store.items())
                 if g == group and p == plural and (namespace is None or ns == namespace) and _selected(o, selector)]
        api_version = f"{group}/{self._version(group, plural)}" if group else "v1"
        return {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {"resourceVersion": str(self._last_rv)},
                "items": items}

    # -- watch --------------------------------------------------------------------------------------
    def _watch(self, handler, group, plural, namespace, query, record: dict) -> None:
        since = query.get("resourceVersion", "")
        selector = query.get("labelSelector")
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 1800))
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def matches(event) -> bool:
            _, _, g, p, ns, obj = event
            return g == group and p == plural and (namespace is None or ns == namespace) and _selected(obj, selector)

        with self._lock:
            if since in ("", "0"):
                pending = [("ADDED", o) for o in self._list(group, plural, namespace, selector)["items"]]
                cursor = self._last_rv
            elif int(since) < self._compacted:
                gone = ApiError(410, "Expired", f"too old resource version: {since} ({self._compacted})")
                pending, cursor = [("ERROR", gone.status())], None
                record["code"] = 410  # the HTTP status is 200: the API server says it in the stream
            else:
                cursor = int(since)
                pending = []
        try:
            while True:
                for kind, obj in pending:
                    _chunk(handler, json.dumps({"type": kind, "object": obj}) + "\n")
                if cursor is None:
                    break
                with self._lock:
                    while True:
                        fresh = [e for e in self._events if e[0] > cursor and matches(e)]
                        left = deadline - time.monotonic()
                        if fresh or left <= 0 or self._stopped:
                            break
                        self._lock.wait(min(left, 1.0))
                    cursor = max([cursor, *(e[0] for e in self._events if e[0] > cursor)])
                    pending = [(e[1], e[5]) for e in fresh]
                    if not pending and (left <= 0 or self._stopped):
                        break
            _chunk(handler, "")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- HTTP -----------------------------------------------------------------------------------------
    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        match = _PATH.match(url.path)
        record = {"method": method, "path": url.path, "plural": match and match["plural"],
                  "watch": query.get("watch", "").lower() in ("true", "1"),
                  "agent": handler.headers.get("User-Agent"), "code": 200, "at": time.monotonic()}
        self.requests.append(record)
        try:
            if match is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
            group = match["group"] or ""
            version = match["core"] or match["version"]
            plural, name, sub, namespace = match["plural"], match["name"], match["sub"], match["ns"]
            if (group, version, plural) not in RESOURCES:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
            body = None
            if method in ("POST", "PUT", "PATCH"):
                length = int(handler.headers.get("Content-Length", 0))
                body = json.loads(handler.rfile.read(length) or b"null")
                if method == "PATCH" and "json-patch" in handler.headers.get("Content-Type", ""):
                    raise ApiError(415, "UnsupportedMediaType", "the fake API server takes merge patches only")
            token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if token:
                with self._lock:
                    user = self._tokens.get(token)
                    if user is None:
                        raise ApiError(401, "Unauthorized", "Unauthorized")
                    record["user"] = user
                    self._authorize(user, method, group, plural, sub, namespace, name, query, body)
            with self._lock:
                self._check_failure(method, plural)
            if method == "GET" and name is None and record["watch"]:
                self._watch(handler, group, plural, namespace, query, record)
                return
            with self._lock:
                if method == "GET" and sub == "log":
                    self._existing(group, plural, namespace, name)
                    text = self._logs.get((namespace, name), "")
                    if query.get("tailLines"):
                        text = "\n".join(text.splitlines()[-int(query["tailLines"]):])
                    _send(handler, 200, text, "text/plain")
                    return
                if method == "GET":
                    result = (self._list(group, plural, namespace, query.get("labelSelector")) if name is None
                              else self._existing(group, plural, namespace, name))
                    code = 200
                elif method == "POST":
                    result, code = self._create(group, plural, namespace, body), 201
                elif method == "PUT":
                    result, code = self._write(group, plural, namespace, name, body, sub), 200
                elif method == "PATCH":
                    result, code = self._patch(group, plural, namespace, name, body, sub), 200
                elif method == "DELETE":
                    result, code = self._delete(group, plural, namespace, name), 200
                else:
                    raise ApiError(405, "MethodNotAllowed", method)
                result = copy.deepcopy(result)
        except ApiError as exc:
            record["code"] = exc.code
            _send(handler, exc.code, json.dumps(exc.status()))
            return
        record["code"] = code
        _send(handler, code, json.dumps(result))


def _rule_allows(rule: dict, verb: str, group: str, resource: str, name: str | None) -> bool:
    """One PolicyRule: a named rule never allows a collection or a create (``name`` None)."""
    def has(field: str, value) -> bool:
        values = rule.get(field) or []
        return value in values or "*" in values

    names = rule.get("resourceNames") or []
    return (has("apiGroups", group) and has("resources", resource) and has("verbs", verb)
            and (not names or name in names))


def _send(handler, code: int, text: str, content_type: str = "application/json") -> None:
    data = text.encode()
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _chunk(handler, text: str) -> None:
    data = text.encode()
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def _handler(server: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams the client reads event by event

        def do_GET(self):
            server.handle(self, "GET")

        def do_POST(self):
            server.handle(self, "POST")

        def do_PUT(self):
            server.handle(self, "PUT")

        def do_PATCH(self):
            server.handle(self, "PATCH")

        def do_DELETE(self):
            server.handle(self, "DELETE")

        def log_message(self, *args):  # quiet: the requests are kept in server.requests
            pass

    return Handler
