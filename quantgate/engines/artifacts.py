"""What the matrix serves: the recipe's quantized candidates (found in the workspace) and extras:
GGUF files — the bundled model's own GGUF, a file, or one converted from a candidate's folder
with llama.cpp's `convert_hf_to_gguf.py` — and checkpoint folders made elsewhere.

The converter ships only in llama-cpp-python's source archive (vendor/llama.cpp/, beside its
gguf-py), and it runs in the llama.cpp engine's interpreter, which then also needs torch, numpy,
transformers, safetensors and sentencepiece. Conversions are cached in the workspace under
artifacts/gguf-<name>-<outtype>-<key>/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import QuantgateError
from ..formats import Artifact, artifact_of_candidate, format_of
from ..recipe import stable_hash
from ..util import atomic_dir, atomic_write_json
from ..workspace import CANDIDATE_RECORD, candidate_record, read_json


def _read_json(p: Path) -> dict:
    return read_json(p) or {}


def candidate_artifacts(recipe, ws, names: list[str] | None = None) -> tuple[list[Artifact], dict[str, str]]:
    """(artifacts found, {candidate: why missing}). Looks in the run's quantize.json first, then
    for any artifact in the workspace made from the same spec and model (a run quantized in parts)."""
    wanted = [c for c in recipe.candidates if not names or c.name in names]
    unknown = set(names or ()) - {c.name for c in recipe.candidates}
    if unknown:
        raise QuantgateError(f"recipe '{recipe.name}' has no candidate(s) {', '.join(sorted(unknown))}; "
                             f"candidates: {', '.join(c.name for c in recipe.candidates)}")
    found: dict[str, Path] = {}
    for r in ws.run(recipe).quantize_results(required=False):
        if r.artifact and r.status != "failed" and candidate_record(r.artifact) is not None:
            found[r.name] = Path(r.artifact)
    if ws.artifacts.is_dir():
        for c in wanted:
            if c.name in found:
                continue
            params = c.model_dump(mode="json", exclude={"name", "engine"})
            best = None
            for rec_file in ws.artifacts.glob(f"*/{CANDIDATE_RECORD}"):
                rec = _read_json(rec_file)
                p = {k: v for k, v in (rec.get("params") or {}).items() if k not in ("name", "engine")}
                if p == params and (rec.get("model") or {}).get("ref") == recipe.model.ref:
                    if best is None or rec_file.stat().st_mtime > best.stat().st_mtime:
                        best = rec_file
            if best is not None:
                found[c.name] = best.parent
    arts, missing = [], {}
    for c in wanted:
        if c.name not in found:
            missing[c.name] = "not quantized in this workspace yet (run `quantgate quantize RECIPE`)"
            continue
        folder = found[c.name]
        arts.append(artifact_of_candidate(c.name, folder, candidate_record(folder) or {},
                                          _read_json(folder / "config.json")))
    return arts, missing


def gguf_file_type(path: str | Path) -> str | None:
    """The GGUF's file type name (Q4_1, Q8_0, F16, ...) from its header, if the gguf package is here."""
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError:
        return None
    try:
        field = GGUFReader(str(path)).fields.get("general.file_type")
        if field is None:
            return None
        value = int(field.parts[field.data[0]][0])
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except Exception:  # a header we cannot read is described by the engine instead
        return None


def extra_artifacts(selection, recipe, ws, by_name: dict[str, Artifact], *, converter: tuple[str, str] | None,
                    log=print) -> tuple[list[Artifact], dict[str, str]]:
    """The selection's extra GGUFs as artifacts; ({name: why missing}) for those that could not be had.
    `converter` is (python, path to convert_hf_to_gguf.py) or None."""
    from ..models import _bundled_file, parse_ref, resolve

    tokenizer = None
    try:
        tokenizer = str(resolve(recipe.model.ref, revision=recipe.model.revision, progress=log))
    except QuantgateError:
        pass
    out, missing = [], {}
    for x in selection.extra:
        try:
            if x.folder is not None:
                folder = Path(x.folder).expanduser()
                if not (folder / "config.json").is_file():
                    raise QuantgateError(f"extra '{x.name}': {folder} is not a checkpoint folder (no config.json)")
                rec = candidate_record(folder) or {"format": format_of(_read_json(folder / "config.json"))}
                art = artifact_of_candidate(x.name, folder, rec, _read_json(folder / "config.json"))
                out.append(Artifact(**{**art.to_dict(), "origin": "extra"}))
                continue
            if x.gguf is not None:
                if x.gguf.startswith("bundled:"):
                    path = _bundled_file(parse_ref(x.gguf).name)
                else:
                    path = Path(x.gguf).expanduser()
                    if not path.is_file():
                        raise QuantgateError(f"extra '{x.name}': {path} is not a file")
            else:
                src = by_name.get(x.convert_from)
                if src is None:
                    raise QuantgateError(f"extra '{x.name}': candidate '{x.convert_from}' has no artifact here")
                if src.format != "dense":
                    raise QuantgateError(f"extra '{x.name}': '{x.convert_from}' is {src.format}; only a dense "
                                         "folder converts to GGUF (GPTQ/AWQ packing has no GGUF equivalent)")
                path = convert_to_gguf(src, x.outtype, ws.artifacts, converter, log=log)
            out.append(Artifact(name=x.name, path=str(path), format="gguf", method="gguf",
                                dtype=gguf_file_type(path), tokenizer=tokenizer, origin="extra"))
        except QuantgateError as exc:
            missing[x.name] = str(exc)
    return out, missing


def _byte_level(pre: dict | None) -> bool:
    if not isinstance(pre, dict):
        return False
    return pre.get("type") == "ByteLevel" or any(_byte_level(p) for p in pre.get("pretokenizers") or [])


def normalize_tokenizer(tok_json: dict, tok_config: dict, config: dict) -> tuple[dict, dict, list[str]]:
    """Pure: the tokenizer files as llama.cpp's converter must see them, and what was changed.

    transformers writes a GGUF-born byte-level BPE tokenizer with `byte_fallback: true` and may
    name a wrong eos token in tokenizer_config.json; the converter then takes the vocabulary for a
    SentencePiece one (the server crashes on the first request) and stops generation on the
    wrong token. A byte-level BPE never falls back to bytes, and config.json's token ids rule."""
    tok_json, tok_config, changes = json.loads(json.dumps(tok_json)), dict(tok_config), []
    model = tok_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and _byte_level(tok_json.get("pre_tokenizer")):
        model["byte_fallback"] = False
        changes.append("tokenizer.json: byte_fallback true → false (a byte-level BPE)")
    names = {v: k for k, v in (model.get("vocab") or {}).items()}
    names.update({a["id"]: a["content"] for a in tok_json.get("added_tokens") or []})
    for key in ("bos", "eos"):
        tid = config.get(f"{key}_token_id")
        tid = tid[0] if isinstance(tid, list) and tid else tid
        want = names.get(tid) if isinstance(tid, int) else None
        have = tok_config.get(f"{key}_token")
        have = have.get("content") if isinstance(have, dict) else have
        if want and have != want:
            tok_config[f"{key}_token"] = want
            changes.append(f"tokenizer_config.json: {key}_token {have!r} → {want!r} (config.json's {key}_token_id)")
    return tok_json, tok_config, changes


def _stage(src: Path, stage: Path) -> list[str]:
    """A view of `src` for the converter: weights linked, tokenizer files normalized."""
    stage.mkdir(parents=True, exist_ok=True)
    tj, tc = _read_json(src / "tokenizer.json"), _read_json(src / "tokenizer_config.json")
    new_tj, new_tc, changes = normalize_tokenizer(tj, tc, _read_json(src / "config.json")) if tj else (tj, tc, [])
    for f in src.iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json") and changes:
            continue
        os.symlink(f.resolve(), stage / f.name)
    if changes:
        (stage / "tokenizer.json").write_text(json.dumps(new_tj))
        (stage / "tokenizer_config.json").write_text(json.dumps(new_tc))
    return changes


def convert_to_gguf(src: Artifact, outtype: str, artifacts_dir: Path, converter: tuple[str, str] | None,
                    log=print, timeout_s: float = 1800) -> Path:
    """Convert a dense folder to GGUF once (cached by the source's record and the outtype)."""
    if converter is None:
        raise QuantgateError("converting to GGUF needs llama.cpp's convert_hf_to_gguf.py: set "
                             "gguf_converter (or $QUANTGATE_GGUF_CONVERTER) to the file from the "
                             "llama-cpp-python source archive (vendor/llama.cpp/convert_hf_to_gguf.py)")
    python, script = converter
    if not Path(script).is_file():
        raise QuantgateError(f"the GGUF converter {script} does not exist")
    rec = candidate_record(src.path) or {}
    key = stable_hash({"source": rec.get("candidate_key") or rec.get("checksums") or src.path, "outtype": outtype,
                       "staging": 1})
    target = artifacts_dir / f"gguf-{src.name}-{outtype}-{key[:12]}"
    if (target / "model.gguf").is_file():
        return target / "model.gguf"
    log(f"converting {src.name} to GGUF {outtype} with {script}")
    gguf_py = Path(script).parent / "gguf-py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(gguf_py), os.environ.get("PYTHONPATH")]))}
    with atomic_dir(target) as tmp:
        changes = _stage(Path(src.path), tmp / "stage")
        for c in changes:
            log(f"  for the converter: {c}")
        proc = subprocess.run([python, script, str(tmp / "stage"), "--outtype", outtype, "--outfile",
                               str(tmp / "model.gguf")], capture_output=True, text=True, env=env, timeout=timeout_s)
        shutil.rmtree(tmp / "stage", ignore_errors=True)
        if proc.returncode != 0 or not (tmp / "model.gguf").is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
            raise QuantgateError(f"convert_hf_to_gguf.py failed on {src.path} (exit {proc.returncode}):\n{tail}")
        atomic_write_json(tmp / "source.json", {"from": src.path, "candidate": src.name, "outtype": outtype,
                                                "converter": script, "key": key, "normalized": changes})
    return target / "model.gguf"
