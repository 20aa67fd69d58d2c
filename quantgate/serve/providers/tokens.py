"""A deployment's own prompt count: its tokenizer and its chat template, read from its folder.

The input cap (serve/guards/input_size.py) counts a prompt the way the engine will see it: the
chat template rendered over the messages, then tokenized. For an engine the gateway does not run
in process (vLLM, llama.cpp, any OpenAI-compatible server with the checkpoint on this machine),
the folder holds `tokenizer.json` and `tokenizer_config.json` (its `chat_template`, or a
`chat_template.jinja` beside it): the `tokenizers` library reads the first (no torch, no
transformers), jinja2's sandbox renders the second the way transformers does (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`).

Both libraries are imported when a counter is first loaded, never at import time; a counter is
loaded once per folder (and file version) and shared by every deployment and reload that serves
it. A folder without them gives None: the gateway's estimate stands, and the log says so once.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

log = logging.getLogger("quantgate.serve")

_LOCK = threading.Lock()
_LOADED: dict[tuple, "TokenCounter | None"] = {}


def _special(v) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        return str(v.get("content") or "")
    return v if isinstance(v, str) else ""


def _template(folder: Path, config: dict) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if not t and (folder / "chat_template.jinja").is_file():
        t = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not t and (folder / "chat_template.json").is_file():
        t = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return t or None


class TokenCounter:
    """Counts a conversation in one deployment's tokens, chat template included."""

    def __init__(self, tokenizer, template, specials: dict[str, str], folder: str):
        self.tok, self.template, self.specials, self.folder = tokenizer, template, specials, folder

    @classmethod
    def load(cls, folder: Path) -> "TokenCounter":
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        config: dict = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        source = _template(folder, config)
        template = None
        if source:
            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
            template = env.from_string(source)
        specials = {k: _special(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        counter = cls(tok, template, specials, str(folder))
        counter.count([{"role": "user", "content": "hello"}])  # a template this cannot render fails here, once
        return counter

    def text(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The prompt as the engine builds it, and whether special tokens are still to be added."""
        if self.template is None:  # a base model: the gateway's plain join (GenRequest.prompt)
            if len(messages) == 1 and messages[0]["role"] == "user":
                return messages[0]["content"], True
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages), True
        return self.template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                    **self.specials), False

    def count(self, messages: list[dict[str, str]]) -> int:
        text, specials = self.text(messages)
        return len(self.tok.encode(text, add_special_tokens=specials).ids)


def tokenizer_folder(deployment) -> Path | None:
    """Where a deployment's tokenizer lives on this machine: the engine's own tokenizer folder, or the
    artifact (a folder, or the folder of a single-file checkpoint); None for a remote one."""
    for p in _local_candidates(deployment):
        if (p / "tokenizer.json").is_file():
            return p
    return None


def _local_candidates(deployment) -> list[Path]:
    engine = getattr(deployment, "engine", None)
    out = []
    for cand in (getattr(engine, "tokenizer", None), getattr(deployment, "artifact", None)):
        if cand and "://" not in cand:
            p = Path(cand).expanduser()
            if p.exists():
                out.append(p if p.is_dir() else p.parent)
    return out


def counter_for(deployment) -> TokenCounter | None:
    """The deployment's counter, loaded once per folder and file version (blocking: call it off the
    event loop). None when its folder has no tokenizer the gateway can read."""
    folder = tokenizer_folder(deployment)
    if folder is None:
        if _local_candidates(deployment):  # a checkpoint here, but no tokenizer the gateway reads
            log.warning("%s: no tokenizer.json beside the checkpoint; its prompts are sized by the gateway's "
                        "estimate", getattr(deployment, "key", deployment))
        return None
    files = [folder / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")]
    key = (str(folder.resolve()), *(f.stat().st_mtime_ns if f.exists() else 0 for f in files))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        try:
            counter = TokenCounter.load(folder)
        except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer leaves the estimate, never a crash
            log.warning("%s: cannot count prompts with the tokenizer in %s (%s: %s); its prompts are sized by "
                        "the gateway's estimate", getattr(deployment, "key", deployment), folder,
                        type(exc).__name__, exc)
            counter = None
        _LOADED[key] = counter
        return counter
