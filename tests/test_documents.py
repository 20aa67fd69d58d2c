"""One loader for every typed document: file:line: field: message, whatever the document."""

import json

import pytest

from quantgate.documents import load_document
from quantgate.engines.spec import EngineSelectionSpec, load_selection
from quantgate.errors import QuantgateError
from quantgate.serve.manifest import ManifestError, load_manifest


def test_engine_selection_errors_carry_the_line_and_the_variant_fields(tmp_path):
    p = tmp_path / "e.engines.yaml"
    p.write_text("engine_selection:\n  goal: latency\n  engines:\n    v:\n      kind: vllm\n      treads: 2\n")
    with pytest.raises(QuantgateError) as e:
        load_selection(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:6: engines.v.treads: unknown field 'treads'; did you mean 'threads'?")


def test_json_manifest_errors_point_at_the_line(tmp_path):
    p = tmp_path / "manifest.json"
    doc = {"schema_version": 2, "active": {"name": "a", "model_version": "1", "provider": {"kind": "mokc"}}}
    p.write_text(json.dumps(doc, indent=2))
    with pytest.raises(ManifestError, match=r"manifest\.json:7: active\.provider: unknown kind 'mokc'; "
                                            r"did you mean 'mock'\?"):
        load_manifest(p)


def test_a_document_that_is_not_a_mapping_says_what_it_should_be(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(QuantgateError, match="e.yaml: a document is a mapping of fields, not a list"):
        load_document(p, EngineSelectionSpec)
