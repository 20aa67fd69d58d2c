"""Security, manifest integrity (issue 10, findings 11, 13): a deleted manifest is reported, a
written manifest is readable by a gateway running as another user and durable, and per-file
checksums over everything an engine reads are verified at start and on every reload."""

from __future__ import annotations

import os
import stat

import httpx
from gwkit import base_manifest, write

from quantgate.serve.manifest import Manifest, write_manifest


def test_a_deleted_manifest_is_reported_and_the_gateway_keeps_serving(serve, manifest_path):
    from gwkit import until

    srv = serve(base_manifest())  # its watcher polls every 50 ms
    gw = srv.gateway
    os.unlink(manifest_path)
    srv.call(until(lambda: "gone" in (gw.last_reload_error or ""), 10, "the deletion reported"))
    assert "gone" in httpx.get(srv.url + "/readyz").json()["reload_error"]
    assert httpx.post(srv.url + "/chat", json={"user_id": "u", "prompt": "still here"}).status_code == 200
    write(manifest_path, base_manifest())  # written back: the error clears
    srv.call(until(lambda: gw.last_reload_error is None, 10, "the restored manifest loaded"))
    assert "reload_error" not in httpx.get(srv.url + "/readyz").json()


def test_a_written_manifest_is_world_readable(tmp_path):
    """promote/rollback left the manifest at 0600, so a gateway running as another user could not reload it."""
    p = tmp_path / "manifest.json"
    write_manifest(p, Manifest.model_validate(base_manifest()))
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------ artifact checksums
def artifact(tmp_path):
    from quantgate.integrity import folder_checksums

    d = tmp_path / "artifact"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights" * 100)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text('{"vocab": {}}')
    (d / "sub" / "modeling_custom.py").write_text("print('remote code')")
    (d / "README.md").write_text("about")
    return d, folder_checksums(d)


def with_artifact(folder, files=None, sha=None, rule="every-file") -> dict:
    m = base_manifest()
    m["active"] = {**m["active"], "artifact": str(folder)}
    if files is not None:
        m["active"]["files"] = files
        if rule:
            m["active"]["files_rule"] = rule
    if sha is not None:
        m["active"]["sha256"] = sha
    return m


def test_checksums_cover_every_file_an_engine_reads(tmp_path):
    from quantgate.integrity import compare

    d, files = artifact(tmp_path)
    assert set(files) == {"model.safetensors", "config.json", "tokenizer.json", "sub/modeling_custom.py", "README.md"}
    changed = {**files, "tokenizer.json": "0" * 64}
    assert compare(changed, files) == [f"tokenizer.json: changed (sha256 {files['tokenizer.json'][:12]}…, "
                                       f"manifest says {'0' * 12}…)"]
    assert "missing" in compare({**files, "extra.bin": "1" * 64}, files)[0]
    assert "not in the manifest" in compare({k: v for k, v in files.items() if k != "config.json"}, files)[0]


def test_a_tampered_artifact_refuses_to_start(tmp_path, manifest_path):
    import pytest

    from quantgate.serve.manifest import ManifestError
    from quantgate.serve.server import ServerThread

    d, files = artifact(tmp_path)
    (d / "tokenizer.json").write_text('{"vocab": {"evil": 1}}')  # not a weight: the old checksum missed it
    write(manifest_path, with_artifact(d, files))
    with pytest.raises(ManifestError, match="tokenizer.json: changed"):
        ServerThread(manifest_path).start()


def test_a_reload_onto_a_tampered_artifact_is_refused_and_the_old_one_keeps_serving(serve, manifest_path, tmp_path):
    d, files = artifact(tmp_path)
    srv = serve(with_artifact(d, files))
    (d / "config.json").write_text('{"model_type": "other"}')
    m = with_artifact(d, files)
    m["active"]["model_version"] = "2"
    write(manifest_path, m)
    assert srv.call(srv.gateway.reload_if_changed()) is False
    ready = httpx.get(srv.url + "/readyz").json()
    assert ready["active"] == "primary@1" and "config.json: changed" in ready["reload_error"]
    assert httpx.post(srv.url + "/chat", json={"user_id": "u", "prompt": "hi"}).status_code == 200


def test_a_file_added_or_changed_after_promote_is_refused_hidden_or_prose_alike(tmp_path, manifest_path):
    """Finding 8: the checksums skipped hidden files, README*, *.md and *.lock, so a file an engine or
    remote code could be pointed at could be added or changed after promote unnoticed."""
    import pytest

    from quantgate.integrity import skipped
    from quantgate.serve.manifest import ManifestError
    from quantgate.serve.server import ServerThread
    from pathlib import Path

    d, files = artifact(tmp_path)
    (d / ".hidden").mkdir()
    (d / ".hidden" / "payload.py").write_text("import os")
    write(manifest_path, with_artifact(d, files))
    with pytest.raises(ManifestError, match=r"\.hidden/payload\.py: not in the manifest"):
        ServerThread(manifest_path).start()
    (d / ".hidden" / "payload.py").unlink()
    (d / "README.md").write_text("changed")
    with pytest.raises(ManifestError, match="README.md: changed"):
        ServerThread(manifest_path).start()
    # quantgate's own records beside the weights are the only files left out (later stages rewrite them)
    assert skipped(Path("candidate.json"), "every-file") and not skipped(Path("sub/candidate.json"), "every-file")
    assert skipped(Path(".x.py"), "v1") and not skipped(Path(".x.py"), "every-file")


def test_a_manifest_from_before_the_rule_is_verified_as_it_was_recorded(serve, manifest_path, tmp_path):
    """Manifests promoted before files_rule existed recorded without prose and hidden files: they still
    load (a README edit does not refuse them) and their weights are still checked."""
    import pytest

    from quantgate.integrity import folder_checksums
    from quantgate.serve.manifest import ManifestError
    from quantgate.serve.server import ServerThread

    d, _ = artifact(tmp_path)
    old = folder_checksums(d, "v1")
    assert "README.md" not in old
    (d / "README.md").write_text("edited after promote")
    srv = serve(with_artifact(d, old, rule=None))
    assert httpx.post(srv.url + "/chat", json={"user_id": "u", "prompt": "hi"}).status_code == 200
    (d / "model.safetensors").write_bytes(b"other" * 100)
    with pytest.raises(ManifestError, match="model.safetensors: changed"):
        ServerThread(manifest_path).start()


def test_an_old_manifest_with_only_the_weights_sha256_still_loads_and_is_checked(serve, manifest_path, tmp_path):
    import pytest

    from quantgate.integrity import weights_sha256
    from quantgate.serve.manifest import ManifestError
    from quantgate.serve.server import ServerThread

    d, _ = artifact(tmp_path)
    srv = serve(with_artifact(d, sha=weights_sha256(d)))
    assert httpx.post(srv.url + "/chat", json={"user_id": "u", "prompt": "hi"}).status_code == 200
    write(manifest_path, with_artifact(d, sha="f" * 64))
    with pytest.raises(ManifestError, match="weights: sha256"):
        ServerThread(manifest_path).start()


def test_credentials_in_a_tracking_uri_are_redacted():
    from quantgate.util import redact_uri

    assert redact_uri("http://bob:s3cret@mlflow:5000") == "http://bob:***@mlflow:5000"
    assert redact_uri("https://tok123@mlflow/") == "https://***@mlflow/"
    assert redact_uri("sqlite:///ws/mlflow.db") == "sqlite:///ws/mlflow.db"
    assert "s3cret" not in redact_uri("error talking to http://bob:s3cret@h: refused")
