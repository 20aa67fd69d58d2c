"""What a checkpoint says about itself must be right for every library that loads it."""

import json

import torch
from safetensors.torch import save_file

from quantgate.models import make_config_portable
from quantgate.quantize.gptqmodel_backend import quantize_config_kwargs
from quantgate.quantize.worker import packed_modules
from quantgate.recipe import Recipe


def test_config_gets_top_level_rope_theta_and_loses_the_offload_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "quantization_config": {"bits": 4, "meta": {"offload_to_disk_path": "/tmp/gptqmodel_x", "mse": 0.0}}}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "meta": {"offload_to_disk_path": "/tmp/y"}}))
    make_config_portable(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert "offload_to_disk_path" not in cfg["quantization_config"]["meta"]
    assert "offload_to_disk_path" not in json.loads((tmp_path / "quantize_config.json").read_text())["meta"]


def test_config_that_already_agrees_is_left_alone(tmp_path):
    text = json.dumps({"model_type": "llama", "rope_theta": 10000.0})
    (tmp_path / "config.json").write_text(text)
    make_config_portable(tmp_path)
    assert (tmp_path / "config.json").read_text() == text


def test_packed_modules_counts_gptq_and_awq_layers(tmp_path):
    def t():
        return torch.zeros(2, 2, dtype=torch.int32)

    save_file({"model.layers.0.mlp.up_proj.qweight": t(), "model.layers.0.mlp.up_proj.scales": t(),
               "model.layers.0.self_attn.q_proj.qweight": t(), "model.embed_tokens.weight": t().float()},
              str(tmp_path / "model.safetensors"))
    assert packed_modules(tmp_path) == 2


def test_gptqmodel_keeps_layers_in_memory():
    r = Recipe.model_validate({"name": "x", "candidates": [{"name": "g", "method": "gptq", "bits": 4, "group_size": 64},
                                                           {"name": "a", "method": "awq", "bits": 4, "group_size": 64}]})
    for c in r.candidates:
        assert quantize_config_kwargs(c)["offload_to_disk"] is False
