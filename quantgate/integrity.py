"""Checksums over every file an engine reads from an artifact folder, computed in one place.

Promote records them in the manifest (`Deployment.files`: relative path → sha256); the gateway
verifies them when it starts and on every hot reload, and refuses a deployment whose files
changed (it keeps serving the one it has). Weights, config, tokenizer and generation files,
and code an engine might import (trust_remote_code) are all covered: every regular file in the
folder, hidden ones and prose included (rule "every-file"), except quantgate's own records beside
the weights. Manifests written before the rule existed (no `files_rule`) recorded under "v1", which
skipped hidden files, README*, *.md and *.lock; they are verified under it, so they still load, and
promote writes "every-file" from now on (a file added later, hidden or not, is refused).

`folder_checksums` reads files (blocking; call it off the event loop); `compare` is pure.
Manifests written before per-file checksums keep their `sha256` (weights_sha256 over the
top-level safetensors), which is still verified; `deployment_problems` handles both.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .util import sha256_file

SKIP_SUFFIXES = (".md", ".lock")  # rule v1 only
# quantgate's own records beside the weights (rewritten by later stages; no engine reads them)
SKIP_NAMES = ("candidate.json", "quantgate-source.json")
RULES = ("v1", "every-file")
CURRENT_RULE = "every-file"  # what promote records (Deployment.files_rule)


def skipped(rel: Path, rule: str) -> bool:
    """Pure: whether the file at `rel` (relative to the artifact folder) is left out under `rule`."""
    if rule not in RULES:
        raise ValueError(f"unknown integrity rule {rule!r} (known: {', '.join(RULES)})")
    if rel.name in SKIP_NAMES and len(rel.parts) == 1:
        return True
    if rule == "v1":
        return (any(part.startswith(".") for part in rel.parts) or rel.suffix.lower() in SKIP_SUFFIXES
                or rel.name.upper().startswith("README") or rel.name in SKIP_NAMES)
    return False


def engine_files(folder: Path, rule: str = CURRENT_RULE) -> list[Path]:
    """The files an engine may read, in a stable order (relative paths sorted)."""
    folder = Path(folder)
    out = [p for p in folder.rglob("*") if p.is_file() and not skipped(p.relative_to(folder), rule)]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def folder_checksums(folder: Path, rule: str = CURRENT_RULE) -> dict[str, str]:
    """Relative POSIX path → sha256 for every file an engine may read."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in engine_files(folder, rule)}


def compare(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """What differs, one line per file ('changed', 'missing', 'not in the manifest'); empty = identical."""
    problems = []
    for name in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(name), actual.get(name)
        if e == a:
            continue
        if a is None:
            problems.append(f"{name}: missing")
        elif e is None:
            problems.append(f"{name}: not in the manifest's checksums (added after promote)")
        else:
            problems.append(f"{name}: changed (sha256 {a[:12]}…, manifest says {e[:12]}…)")
    return problems


def verify_folder(folder: Path, expected: dict[str, str], rule: str = CURRENT_RULE) -> list[str]:
    """Problems with `folder` against the manifest's per-file checksums (blocking)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: artifact folder does not exist"]
    return compare(expected, folder_checksums(folder, rule))


def problems_line(problems: list[str], first: int = 5) -> str:
    """The first few problems on one line, and how many more there are."""
    more = len(problems) - first
    return "; ".join(problems[:first]) + (f"; and {more} more" if more > 0 else "")


def weights_sha256(folder: Path) -> str:
    """One checksum over every safetensors file in a folder, in name order (a manifest's `sha256`)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def deployment_problems(artifact: str | None, files: dict[str, str] | None, sha256: str | None,
                        rule: str | None = None) -> list[str]:
    """What is wrong with a deployment's artifact on disk, from what its manifest entry records (blocking).

    Per-file checksums when the manifest has them, under the rule they were recorded with (None: a
    manifest from before the rule existed, "v1"); else the older whole-weights sha256; nothing to
    check when the artifact is not a local folder (a remote engine, a CLI, a mock).
    """
    if not artifact or "://" in artifact:
        return []
    folder = Path(artifact)
    if files:
        return verify_folder(folder, files, rule or "v1")
    if sha256:
        if not folder.is_dir():
            return [f"{folder}: artifact folder does not exist"]
        got = weights_sha256(folder)
        return [] if got == sha256 else [f"weights: sha256 {got[:12]}…, manifest says {sha256[:12]}…"]
    return []
