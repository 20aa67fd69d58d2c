"""deploy/ holds examples users copy: they must agree with what the tests run."""

from pathlib import Path

import yaml

from quantgate.serve.access import exposure_problem, key_table
from quantgate.serve.manifest import parse_manifest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_the_deploy_manifest_is_valid_shares_state_and_may_be_exposed(monkeypatch):
    monkeypatch.setenv("QUANTGATE_KEY_ACME", "k" * 32)
    monkeypatch.setenv("QUANTGATE_ADMIN_KEY", "a" * 32)
    m = parse_manifest((DEPLOY / "manifest.json").read_bytes(), DEPLOY / "manifest.json")
    assert m.serving.state.redis == "redis://redis:6379/0"
    keys = key_table(m, "deploy/manifest.json")
    assert exposure_problem(m.serving, keys, "0.0.0.0") is None


def test_compose_replicas_balancer_and_mlflow_server_agree_with_the_tests():
    c = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert {"redis", "postgres", "mlflow", "vllm", "gateway-1", "gateway-2", "lb"} <= set(c)
    for g in ("gateway-1", "gateway-2"):
        cmd = c[g]["command"]
        assert cmd[:2] == ["quantgate", "serve"] and "0.0.0.0" in cmd
        assert "./manifest.json:/etc/quantgate/manifest.json:ro" in c[g]["volumes"]
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "server gateway-1:8787" in nginx and "server gateway-2:8787" in nginx
    mlflow = c["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql://")
    # the flags tests/test_track.py starts its PostgreSQL-backed server with
    src = (Path(__file__).parent / "test_track.py").read_text()
    assert all(f in src for f in ("--artifacts-destination", "--serve-artifacts", "--backend-store-uri"))


def _ray_start_flags(text: str) -> list[set[str]]:
    """The flags of each `ray start` command (continuation lines joined), in order."""
    joined = text.replace("\\\n", " ")
    return [{w.split("=")[0] for w in line.split() if w.startswith("--") and w not in ("--address", "--port")}
            for line in joined.splitlines() if line.startswith("ray start") or '"$ray_bin" start' in line]


def test_the_ray_guide_starts_the_cluster_ci_starts():
    guide = _ray_start_flags((DEPLOY / "ray.md").read_text())
    ci = _ray_start_flags((DEPLOY.parent / ".ci" / "ray.sh").read_text())
    assert len(guide) == len(ci) == 2 and guide == ci
    assert "--head" in guide[0] and "--num-cpus" in guide[1]
