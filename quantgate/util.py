"""Small I/O helpers shared by every stage: atomic writes, the cache folder, checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def cache_dir(*parts: str) -> Path:
    """quantgate's cache ($QUANTGATE_CACHE, else ~/.cache/quantgate): converted models, corpora."""
    root = Path(os.environ.get("QUANTGATE_CACHE") or Path.home() / ".cache" / "quantgate")
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write to a temporary file beside the target, fsync, then rename: old or new, never torn.

    The file gets `mode` (a temporary file is created 0600, which would stop a gateway running as
    another user from reading a manifest after promote), and the folder is fsynced after the
    rename so the new name survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it is renamed into place.

    An interruption leaves only a `.tmp-*` folder that the next run removes, never a
    half-written artifact under the real name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def iter_jsonl(path: Path):
    """(line number, object) for each non-blank line; a bad line is an error naming file:line."""
    from .errors import QuantgateError

    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantgateError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise QuantgateError(f"{path}:{i}: each line must be a JSON object, not {type(row).__name__}")
            yield i, row


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?P<pw>:[^/@\s]*)?@")


# a query parameter whose name says it carries a credential (?token=, &api_key=, X-Amz-Signature=, sig=…)
_SECRET_PARAM = re.compile(r"(?P<name>[?&;][A-Za-z0-9_.-]*(?:token|key|secret|passw|pwd|sig|credential|auth|session)"
                           r"[A-Za-z0-9_.-]*=)[^&#\s;]+", re.IGNORECASE)


def redact_uri(text: str) -> str:
    """Hide credentials in URIs anywhere in `text`: scheme://user:password@host → scheme://user:***@host,
    scheme://token@host → scheme://***@host (a lone user part is often a token), and the values of
    query parameters named like credentials (?token=…, &api_key=…, X-Amz-Signature=…) → ***.

    For whatever is printed, logged, sent to MLflow as a parameter or copied into a manifest: the
    credentials stay in the environment or config they came from.
    """
    if "=" in text:
        text = _SECRET_PARAM.sub(lambda m: f"{m['name']}***", text)
    if "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["pw"] else f"{m['scheme']}***@", text)


def with_credentials(uri: str) -> str:
    """Records keep no credentials (redact_uri): a redacted tracking URI's credentials come from the environment
    (MLFLOW_TRACKING_URI), the same URI as whoever wrote the record had it."""
    return os.environ.get("MLFLOW_TRACKING_URI", uri) if "***" in uri else uri
