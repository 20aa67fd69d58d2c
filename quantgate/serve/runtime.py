"""What one loaded manifest becomes at run time, and how a changed file replaces it.

A `Runtime` is a manifest plus started providers for its active and fallback deployments. The
gateway holds one current runtime; every request takes a reference to it when it starts and
keeps using that runtime until it ends, so a promote or rollback switches new requests over at
once while in-flight ones finish on the deployment they started on. A replaced runtime is
closed when its last request is done.

Providers are pooled by deployment: a reload that changes only serving settings (or makes the
old fallback active) reuses the started provider instead of reconnecting or reloading weights.
A deployment whose engine the gateway starts (vLLM, llama.cpp) gets an `EngineProvider` from the
supervisor (serve/supervisor.py): on a reload `Runtime.build` returns only once every new engine
is ready, so the swap in Gateway._reload is the blue/green switch, and the old runtime's engines
stop when its last request is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ..integrity import deployment_problems, problems_line
from .access import Principal, exposure_problem, key_table
from .canary import arm_of
from .manifest import Deployment, Manifest, ManifestError, manifest_digest, parse_manifest
from .providers import Provider, make_provider
from .providers.engine import EngineProvider
from .supervision import launched

log = logging.getLogger("quantgate.serve")


def _identity(d: Deployment) -> str:
    return d.model_dump_json()  # equal deployments (every field) share one provider


class ProviderPool:
    """Started providers with reference counts; closed when no runtime uses them."""

    def __init__(self, supervisor=None):
        self._p: dict[str, list] = {}  # identity → [provider, refs]
        self.supervisor = supervisor  # starts launched engines; None: such deployments are refused

    async def get(self, d: Deployment, wait: bool = True) -> Provider:
        """A started provider for `d`; `wait`: a launched engine must be ready first (a reload)."""
        k = _identity(d)
        if k in self._p:
            self._p[k][1] += 1
            return self._p[k][0]
        if launched(d):
            if self.supervisor is None:
                raise ManifestError(f"{d.key}: its '{d.engine.kind}' engine is started by `quantgate serve`; "
                                    "this gateway has no engine supervisor")
            p = EngineProvider(d, self.supervisor, wait)
        else:
            p = make_provider(d)
        await p.start()
        if k in self._p:  # another reload started the same one meanwhile: keep theirs
            await p.close()
            self._p[k][1] += 1
            return self._p[k][0]
        self._p[k] = [p, 1]
        return p

    async def put(self, d: Deployment) -> None:
        k = _identity(d)
        entry = self._p.get(k)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._p[k]
            await entry[0].close()

    async def close(self) -> None:
        entries, self._p = list(self._p.values()), {}
        for p, _ in entries:
            await p.close()


class Runtime:
    arm = "stable"  # the canary's view of a runtime says "canary" (CanaryView)

    def __init__(self, manifest: Manifest, digest: str, keys: dict[str, Principal]):
        self.manifest, self.digest, self.keys = manifest, digest, keys
        self.serving = manifest.serving
        self.active: Deployment = manifest.active
        self.fallback: Deployment | None = manifest.serving.fallback
        self.providers: dict[str, Provider] = {}
        self.users = 0
        self.retired = False
        self._pool: ProviderPool | None = None
        self._closing: asyncio.Task | None = None
        # a running canary (serve/canary.py): the challenger's provider, the view requests on the canary
        # arm use, why its provider could not be had (fail closed: the canary takes no traffic), and the
        # attempts' observer (serve/canary_run.py) while one runs
        c = manifest.canary
        self.canary = c if c is not None and c.running else None
        self.canary_view: CanaryView | None = None
        self.canary_failure: str | None = None
        self.watch = None

    @classmethod
    async def build(cls, manifest: Manifest, digest: str, pool: ProviderPool, source: str,
                    bind_host: str = "127.0.0.1", wait: bool = True) -> "Runtime":
        """Verify, then start the providers (engines included). `wait=False` (the gateway's start)
        lets launched engines come up in the background; a reload waits for them (blue/green)."""
        keys = key_table(manifest, source)
        problem = exposure_problem(manifest.serving, keys, bind_host)
        if problem:
            raise ManifestError(f"{source}: {problem}")
        await verify_artifacts(manifest, source)
        rt = cls(manifest, digest, keys)
        rt._pool = pool
        roles = [("active", rt.active)] + ([("fallback", rt.fallback)] if rt.fallback else [])
        try:
            for role, d in roles:
                rt.providers[role] = await pool.get(d, wait)
        except BaseException:
            for role, d in roles:
                if role in rt.providers:
                    await pool.put(d)
            raise
        if rt.canary is not None:
            await rt._start_canary(pool, source)
        return rt

    async def _start_canary(self, pool: ProviderPool, source: str) -> None:
        """The challenger's provider, never waited for (a canary engine that never gets ready must not
        hold up the stable's reload); any failure to have it — checksums, a start that raises — is kept
        as `canary_failure`, for the controller to roll the canary back with, instead of refusing the
        manifest: the stable keeps serving whatever the challenger does."""
        d = self.canary.challenger
        try:
            folder = artifact_to_check(d)
            if folder is not None:
                problems = await asyncio.to_thread(deployment_problems, folder, d.files, d.sha256, d.files_rule)
                if problems:
                    raise ManifestError(f"{source}: canary.challenger ({d.key}): the artifact does not match the "
                                        f"manifest's checksums: {problems_line(problems)}")
            self.providers["canary"] = await pool.get(d, wait=False)
        except Exception as exc:  # noqa: BLE001 - fail closed: the canary is rolled back with the reason
            self.canary_failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("canary %s cannot be served, it takes no traffic: %s", d.key, self.canary_failure)
            return
        self.canary_view = CanaryView(self)

    def for_call(self, tenant: str, user: str | None) -> "Runtime":
        """The runtime this caller's request uses: the canary's view when the sticky hash puts the caller on
        the canary and its provider is ready (a starting or crashed canary engine sends everyone to stable)."""
        view = self.canary_view
        if view is None or not self.providers["canary"].available:
            return self
        return view if arm_of(self.canary, tenant, user) == "canary" else self

    def observe(self, kind: str, ttft_ms: float = 0.0, e2e_ms: float = 0.0) -> None:
        """An attempt on this runtime's active deployment ended (`ok`, or a failure kind): into the canary's
        window for this arm while a canary runs."""
        if self.watch is not None:
            self.watch.observe(self.arm, kind, ttft_ms, e2e_ms)

    def deployment(self, role: str) -> Deployment:
        if role == "canary":
            return self.canary.challenger
        return self.active if role == "active" else self.fallback

    def available(self, role: str) -> bool:
        """False while this role's engine is starting or restarting (the request path skips it)."""
        p = self.providers.get(role)
        return p is not None and p.available

    def launched(self, role: str) -> bool:
        """True when this role's deployment runs on an engine the gateway starts (vLLM, llama.cpp)."""
        return launched(self.deployment(role))

    def engines(self) -> dict[str, dict]:
        """The started engines of this runtime's roles, for /readyz: each one's status, or stopped."""
        out = {}
        for role in ("active", "fallback", "canary"):
            if role == "canary" and "canary" not in self.providers:
                continue
            if not self.launched(role):
                continue
            engine = getattr(self.providers.get(role), "engine", None)
            out[role] = engine.status() if engine is not None else {"deployment": self.deployment(role).key,
                                                                     "state": "stopped"}
        return out

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self._schedule_close()

    def retire(self) -> None:
        self.retired = True
        if self.users == 0:
            self._schedule_close()

    def _schedule_close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        for role, d in (("active", self.active), ("fallback", self.fallback),
                        ("canary", self.canary.challenger if self.canary else None)):
            if role in self.providers:
                await self._pool.put(d)
        self.providers = {}


class CanaryView(Runtime):
    """A runtime as a request on the canary arm sees it: the challenger is its active deployment and the
    stable deployment its fallback, so a failed canary attempt is answered by the stable within the same
    budget (a crashing canary costs the client nothing). It shares everything else with the runtime it
    views, whose reference count, retirement and providers it uses; it owns nothing."""

    arm = "canary"

    def __init__(self, base: Runtime):  # noqa: D107 - no Runtime.__init__: the view owns no providers
        self.base = base
        self.manifest, self.digest, self.keys, self.serving = base.manifest, base.digest, base.keys, base.serving
        self.active, self.fallback = base.canary.challenger, base.active
        self.providers = {"active": base.providers["canary"], "fallback": base.providers["active"]}
        self.canary, self.canary_view, self.canary_failure = None, None, None

    @property
    def watch(self):
        return self.base.watch

    def acquire(self) -> None:
        self.base.acquire()

    def release(self) -> None:
        self.base.release()

    def retire(self) -> None:  # only the runtime it views is ever retired
        raise TypeError("a canary view is never retired itself")


def artifact_to_check(d: Deployment) -> str | None:
    """The local folder an engine reads for this deployment, when there is one to check here.
    A launched engine's files are checked by the supervisor right before each start instead."""
    if launched(d):
        return None
    if d.provider.kind == "local":
        return d.provider.model or d.artifact
    # a remote engine, a CLI or a mock: the artifact is checked only when it is on this machine
    return d.artifact if d.artifact and os.path.isdir(d.artifact) else None


async def verify_artifacts(m: Manifest, source: str) -> None:
    """Refuse (ManifestError) a manifest whose artifacts differ from the checksums it records.

    Hashing reads every weight file, so it runs in a thread: the gateway keeps answering
    with the runtime it has while a reload is verified.
    """
    roles = [("active", m.active)] + ([("serving.fallback", m.serving.fallback)] if m.serving.fallback else [])
    for role, d in roles:
        folder = artifact_to_check(d)
        if folder is None:
            continue
        problems = await asyncio.to_thread(deployment_problems, folder, d.files, d.sha256, d.files_rule)
        if problems:
            shown = problems_line(problems)
            raise ManifestError(f"{source}: {role} ({d.key}): the artifact does not match the manifest's "
                                f"checksums: {shown}. Re-promote it (quantgate promote) if the change is intended")
        if not d.files and not d.sha256:
            log.warning("%s: %s (%s) has no checksums; its files are not verified (promote records them)",
                        source, role, d.key)


class ManifestFile:
    """Change detection for the manifest file: stat first (cheap), hash only when stat changed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stat: tuple | None = None
        self.digest: str | None = None

    def _sig(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> tuple[Manifest, str]:
        """Read and validate now (raises ManifestError); remembers what was read."""
        sig = self._sig()
        data = self.path.read_bytes() if sig else None
        if data is None:
            raise ManifestError(f"{self.path}: no such manifest file")
        m = parse_manifest(data, self.path)
        self._stat, self.digest = sig, manifest_digest(data)
        return m, self.digest

    def changed(self) -> tuple[Manifest, str] | None:
        """A new valid manifest when the file's content changed; None when it did not.

        Raises ManifestError when it changed into something invalid (the caller keeps serving
        the old one); the bad content is remembered so the error is reported once, not per poll.
        """
        sig = self._sig()
        if sig is None:
            if self._stat is None:
                return None  # already reported
            self._stat = None
            raise ManifestError(f"{self.path}: the manifest file is gone (deleted or moved); still serving "
                                "what it said last — write it back to change anything")
        if sig == self._stat:
            return None
        data = self.path.read_bytes()
        digest = manifest_digest(data)
        was_missing, self._stat = self._stat is None, sig
        if digest == self.digest and not was_missing:
            return None  # touched or rewritten with the same bytes
        self.digest = digest
        return parse_manifest(data, self.path), digest

