"""Who may call the gateway: API keys bound to tenants (and users), admin keys, anonymous access.

Pure decisions over the manifest's key table and a request's headers; app.py turns a refusal
into the HTTP answer. The rules:

- A key names its tenant (and, when bound, its user): a body's `tenant`/`user_id` may repeat
  them but never change them (403).
- Requests without a key are served only when the manifest says `serving.anonymous: true`, and
  only on a loopback bind (`exposure_problem` refuses to start otherwise); an anonymous request
  may not name a tenant that has keys, so it cannot spend a keyed tenant's budget.
- `/metrics` and the details of `/readyz` need an admin key once any key is configured.
- Host and Origin are checked so a web page cannot reach a loopback gateway (DNS rebinding, a
  cross-site form post): see `host_problem` and `origin_problem`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass

from ..procs import withhold
from .manifest import ApiKeyRef, Manifest, ManifestError, ServingSpec
from .tenants import DEFAULT_TENANT

TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


@dataclass(frozen=True, slots=True)
class Principal:
    """What a key stands for."""

    tenant: str | None        # None for an admin key
    user: str | None = None   # set when the key is bound to one user
    admin: bool = False
    key_id: str | None = None  # a prefix of the key's digest: who shares a cache scope 'key' (never the key)


class Refusal(Exception):
    """A request the access rules turn away: HTTP status, error type, message, header to fix."""

    def __init__(self, status: int, type_: str, message: str, param: str):
        super().__init__(message)
        self.status, self.type, self.param = status, type_, param


def _digest(ref: ApiKeyRef, where: str, source: str) -> str:
    if ref.sha256:
        return ref.sha256
    raw = os.environ.get(ref.env)
    if not raw:
        raise ManifestError(f"{source}: {where}.env: environment variable {ref.env} is not set "
                            "(it should hold the API key)")
    withhold(ref.env)  # the engines and CLIs this gateway starts never see its keys
    return hashlib.sha256(raw.encode()).hexdigest()


def key_table(m: Manifest, source: str) -> dict[str, Principal]:
    """sha256(key) → Principal, from hashes in the manifest or keys read from env vars now."""
    table: dict[str, Principal] = {}
    for tenant, refs in m.serving.api_keys.items():
        for i, ref in enumerate(refs):
            d = _digest(ref, f"serving.api_keys.{tenant}.{i}", source)
            table[d] = Principal(tenant, ref.user, key_id=d[:16])
    for i, ref in enumerate(m.serving.admin_keys):
        d = _digest(ref, f"serving.admin_keys.{i}", source)
        if d in table:
            raise ManifestError(f"{source}: serving.admin_keys.{i}: the same key is also a tenant's key; "
                                "give admin access its own key")
        table[d] = Principal(None, None, True)
    return table


@functools.lru_cache(maxsize=256)  # the Host header of every request: parsing an address costs ~10 us
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(s: ServingSpec, keys: dict[str, Principal], host: str) -> str | None:
    """Why this manifest must not be served on `host`; None when it may."""
    if is_loopback(host):
        return None
    if not any(p.tenant for p in keys.values()):
        return (f"--host {host} is reachable from other machines, and the manifest has no API keys: add "
                "serving.api_keys (tenant → [{sha256: ...} or {env: VAR}]) or serve on 127.0.0.1")
    if s.anonymous:
        return (f"--host {host}: serving.anonymous is true, which is allowed only on a loopback address; "
                "set it to false or serve on 127.0.0.1")
    return None


def key_of(headers) -> str | None:
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key")
    return key or None


def lookup(keys: dict[str, Principal], known: dict[str, Principal], key: str) -> Principal | None:
    """The key's principal; `known` remembers raw → principal for valid keys only (bounded by the key list)."""
    p = known.get(key)
    if p is None:
        p = keys.get(hashlib.sha256(key.encode()).hexdigest())
        if p is not None:
            known[key] = p
    return p


def identify(s: ServingSpec, keys: dict[str, Principal], principal: Principal | None, key_given: bool,
             asked_tenant: str | None, asked_user: str | None) -> tuple[str, str | None]:
    """(tenant, user) the request is accounted to, or Refusal. `principal` is the looked-up key."""
    if key_given:
        if principal is None:
            raise Refusal(401, "authentication_error", "authorization: unknown API key", "authorization")
        if principal.admin:
            raise Refusal(403, "permission_error", "authorization: an admin key cannot make requests; "
                          "use a tenant's key", "authorization")
        if asked_tenant and asked_tenant != principal.tenant:
            raise Refusal(403, "permission_error", f"tenant: this API key belongs to tenant {principal.tenant!r}",
                          "tenant")
        if principal.user is not None:
            if asked_user and asked_user != principal.user:
                raise Refusal(403, "permission_error", f"user: this API key belongs to user {principal.user!r}",
                              "user")
            return principal.tenant, principal.user
        return principal.tenant, asked_user
    if not s.anonymous:
        raise Refusal(401, "authentication_error",
                      "authorization: this gateway needs an API key (Authorization: Bearer KEY, or x-api-key)",
                      "authorization")
    tenant = asked_tenant or DEFAULT_TENANT
    if not TENANT_RE.fullmatch(tenant):
        raise Refusal(400, "invalid_request_error", "x-tenant: letters, digits and . _ : @ + -", "x-tenant")
    if tenant in s.api_keys:
        raise Refusal(401, "authentication_error",
                      f"authorization: tenant {tenant!r} needs its API key", "authorization")
    return tenant, asked_user


def admin_problem(keys: dict[str, Principal], principal: Principal | None) -> Refusal | None:
    """None when the caller may see operational details (/metrics, full /readyz)."""
    if not keys:
        return None  # no keys at all: loopback-only anonymous gateway, as before
    if principal is not None and principal.admin:
        return None
    return Refusal(401 if principal is None else 403, "authentication_error",
                   "authorization: this needs an admin key (serving.admin_keys)", "authorization")


def _host_only(value: str) -> str:
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def host_problem(host_header: str | None, bind_host: str, allowed: list[str]) -> bool:
    """True when a loopback gateway is asked for by another name (DNS rebinding).

    A gateway bound to a public address is reached by names nobody can list in advance, and keys
    protect it; the check applies to loopback binds, where a browser is the threat.
    """
    if not is_loopback(bind_host) or host_header is None:
        return False
    h = _host_only(host_header)
    return not (is_loopback(h) or h in allowed)


def origin_problem(origin: str | None, allowed: list[str]) -> bool:
    """True for a browser request from a page the manifest does not allow."""
    if origin is None:
        return False
    return origin.rstrip("/") not in allowed


def is_json(content_type: str | None) -> bool:
    """Only JSON bodies: a cross-site form or text/plain post (no CORS preflight) is refused."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
