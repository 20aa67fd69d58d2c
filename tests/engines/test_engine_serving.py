"""Promote from the evidence: which engine serves a candidate, from the card's row or --engine, refused
when the matrix saw it fail or the format table rules it out; the manifest takes what this writes."""

from __future__ import annotations

import pytest

from quantgate.deploy import with_engine
from quantgate.engine_spec import Served
from quantgate.engines.serving import choose, engine_of_pair, for_choice, from_card, parse_choice
from quantgate.errors import QuantgateError
from quantgate.formats import DESC_ACT, Artifact
from quantgate.serve.manifest import Deployment
from quantgate.serve.promote import PromotionRefused

VLLM_ARGV = ["/e/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/w/gptq", "--port", "8000",
             "--dtype", "bfloat16", "--max-model-len", "2048", "--quantization", "gptq_marlin"]


def pair(name, engine, kind, e2e, **kw):
    p = {"engine": engine, "engine_kind": kind, "measured": True, "threads": None,
         "artifact": {"name": name, "path": f"/w/{name}", "format": "gptq", "label": "gptq w4g64"},
         "metrics": {"e2e_p95_ms": e2e, "ttft_p95_ms": e2e / 3, "slo_attainment": 1.0, "error_rate": 0.0,
                     "timeout_rate": 0.0}, "quality": {"passed": True}, **kw}
    if kind == "vllm":
        # what the matrix stores: the spec as it started, and the command it made, for people
        p["engine_spec"] = {"kind": "vllm", "python": VLLM_ARGV[0], "dtype": "bfloat16", "max_model_len": 2048,
                            "quantization": "gptq_marlin", "port": 8000}
        p["serve_command"] = {"argv": VLLM_ARGV, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "port": 8000}
        p["kernel"] = "CPUWNA16 (W4A16)"
    return p


CARD = {"goal": {"kind": "latency"}, "constraints": {"device": "cpu"},
        "pairs": [pair("gptq", "vllm", "vllm", 800), pair("gptq", "transformers", "transformers", 3000),
                  pair("base", "transformers", "transformers", 2500)],
        "recommendation": {"recommended": "gptq @ vllm"},
        "matrix": [{"artifact": {"name": "gptq-act"}, "engine": "vllm", "engine_kind": "vllm",
                    "observed": {"tried": True, "loads": False,
                                 "reason": "ValueError: desc_act with groups is not supported by this kernel"}}]}


def art(name="gptq", **kw) -> Artifact:
    return Artifact(**{"name": name, "path": f"/w/{name}", "format": "gptq", "bits": 4, "group_size": 64,
                       "sym": True, "act_order": False, **kw})


def test_the_card_row_is_used_and_named():
    c = from_card(CARD, "gptq")
    assert c.source == "engine card: row 'gptq @ vllm', the card's recommendation"
    assert c.engine["kind"] == "vllm" and c.engine["quantization"] == "gptq_marlin"
    assert c.engine["dtype"] == "bfloat16" and c.engine["max_model_len"] == 2048 and c.engine["python"] == VLLM_ARGV[0]
    assert c.provider == {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "gptq"}
    other = from_card(CARD, "base")
    assert other.engine["kind"] == "transformers" and "(the card recommends gptq @ vllm)" in other.source
    assert from_card(CARD, "never-measured") is None
    assert choose(art("never-measured"), CARD, None) is None  # promote keeps its in-process default


def test_what_promote_writes_is_a_valid_engine_deployment():
    c = from_card(CARD, "gptq")
    d, ev = with_engine(Deployment(name="gptq", artifact="/w/gptq"), c, force=False, reason="")
    assert d.engine.kind == "vllm" and d.engine.argv is None and d.provider.kind == "openai"
    assert d.engine.kernel == "CPUWNA16 (W4A16)" and d.engine.python == VLLM_ARGV[0]
    argv = d.engine.command(Served("/w/gptq", "gptq"), 8000).argv  # built from the spec: the card's command
    assert argv[:len(VLLM_ARGV) - 4] == VLLM_ARGV[:len(VLLM_ARGV) - 4] or set(VLLM_ARGV) <= set(argv)
    assert argv[argv.index("--quantization") + 1] == "gptq_marlin" and argv[argv.index("--dtype") + 1] == "bfloat16"
    assert d.max_input_tokens == 2048 and ev["source"].startswith("engine card: row 'gptq @ vllm'")
    d, ev = with_engine(Deployment(name="x", artifact="/w/x", provider={"kind": "local"}), None, force=False, reason="")
    assert d.engine.kind == "transformers" and d.provider.kind == "local" and "in-process" in ev["source"]
    t, _ = engine_of_pair(pair("gptq", "transformers", "transformers", 1), "cpu")
    assert Deployment(name="t", artifact="/w/t", engine=t, provider={"kind": "local"}).engine.kind == "transformers"


def test_a_card_written_before_specs_were_stored_serves_its_command_verbatim():
    old = pair("gptq", "vllm", "vllm", 800)
    del old["engine_spec"]
    engine, provider = engine_of_pair(old, "cpu")
    d = Deployment(name="gptq", artifact="/w/gptq", engine=engine, provider=provider)
    assert d.engine.argv == VLLM_ARGV and d.engine.python == VLLM_ARGV[0]
    assert d.engine.command(Served("/w/gptq", "gptq"), 4242).argv == [*VLLM_ARGV[:6], "4242", *VLLM_ARGV[7:]]


def test_a_pair_the_matrix_saw_fail_is_refused_with_the_engines_message_unless_forced():
    a = art("gptq-act", act_order=True)
    c = for_choice("vllm", a, CARD)
    assert c.refused == "ValueError: desc_act with groups is not supported by this kernel"
    dep = Deployment(name="gptq-act", artifact="/w/gptq-act")
    with pytest.raises(PromotionRefused, match="desc_act with groups is not supported"):
        with_engine(dep, c, force=False, reason="")
    with pytest.raises(PromotionRefused, match="--force needs --reason"):
        with_engine(dep, c, force=True, reason=" ")
    d, ev = with_engine(dep, c, force=True, reason="kernel patched in our build")
    assert d.engine.kind == "vllm" and ev["refused_but_forced"] == c.refused
    # without a card, the format table's reason
    assert DESC_ACT in for_choice("vllm", a, None).refused
    assert "llama.cpp reads GGUF files only" in for_choice("llamacpp", art(), None).refused


def test_engine_choices():
    c = for_choice("vllm", art(), None)
    assert c.refused is None and "argv" not in c.engine and c.engine["python"].endswith("python")
    assert c.engine["port"] == 8000 and c.engine["max_model_len"] == 2048
    d = Deployment(name="gptq", artifact="/w/gptq", engine=c.engine, provider=c.provider)
    assert d.engine.command(Served("/w/gptq", "gptq"), 1).argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    u = for_choice("url:http://10.0.0.5:8000/", art(), None)
    assert u.engine == {"kind": "openai", "source": "--engine url:http://10.0.0.5:8000/"}
    assert u.provider["base_url"] == "http://10.0.0.5:8000/v1"
    assert for_choice("transformers", art(), None).provider == {"kind": "local", "model": "/w/gptq", "device": "cpu"}
    assert choose(art(), CARD, "transformers").source == "--engine transformers"  # --engine wins over the card
    with pytest.raises(QuantgateError, match="choose one of vllm, llamacpp, transformers, url:URL"):
        parse_choice("vlm")
    with pytest.raises(QuantgateError, match="give the server's URL"):
        parse_choice("url:10.0.0.5")


def test_the_card_is_logged_to_mlflow_with_the_run(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from quantgate.track import log_engine_card

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(exp).info.run_id
    (tmp_path / "card.json").write_text(json.dumps(CARD))
    (tmp_path / "card.md").write_text("# card\n")
    log_engine_card(uri, run_id, tmp_path / "card.json", tmp_path / "card.md")
    names = {a.path for a in client.list_artifacts(run_id, "engine_card")}
    assert names == {"engine_card/card.json", "engine_card/card.md", "engine_card/pairs.json"}
    assert client.get_run(run_id).data.tags["quantgate.engine_recommended"] == "gptq @ vllm"
    table = json.loads((tmp_path / "art" / run_id / "artifacts" / "engine_card" / "pairs.json").read_text())
    assert table["columns"][0] == "pair" and ["gptq @ vllm", "vllm"] == table["data"][0][:2]
