"""Which engine serves a promoted candidate: from the engine-selection card's evidence, or from an
`--engine` choice — as the plain `engine` and `provider` mappings a manifest Deployment takes.

The card wins when it measured the candidate: the recommended pair when it is this candidate's,
else the candidate's best-ranked pair, and the answer names the row it used. An engine the matrix
saw fail on this artifact (a cell whose start failed) is refused with the engine's own message;
one the format table (quantgate.formats) rules out is refused with the table's reason. Both only
unless forced. Pure except `for_choice`, which resolves the engine's interpreter like the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine_spec import KINDS
from ..errors import QuantgateError
from ..formats import Artifact, expected
from .card import card_attainment, deployment_of, pair_id, rank
from .quality import refusal as engine_refusal
from .spec import EngineSpec, engine_python

def choices() -> tuple[str, ...]:
    """What --engine takes: every kind quantgate starts or runs in process, and url:URL (a running
    server, engine kind openai) — from the registry, so a registered kind is offered too."""
    return (*[k for k, v in KINDS.items() if v.launched or v.provider == "local"], "url:URL")
DEFAULT_PORT = 8000


@dataclass
class EngineChoice:
    """What promote writes: the manifest's `engine` and `provider`, where they came from, and any refusal."""

    engine: dict
    provider: dict
    source: str
    refused: str | None = None  # the engine's own message, or the format table's reason
    notes: list[str] = field(default_factory=list)


def parse_choice(text: str) -> tuple[str, str | None]:
    """'vllm' | 'llamacpp' | 'transformers' | 'url:http://host:port' → (kind, url)."""
    if text.startswith("url:"):
        url = text[4:].strip()
        if not url.startswith(("http://", "https://")):
            raise QuantgateError(f"--engine {text}: give the server's URL, e.g. url:http://10.0.0.5:8000")
        return "openai", url
    if text in choices()[:-1]:
        return text, None
    raise QuantgateError(f"--engine {text!r}: choose one of {', '.join(choices())}")


def engine_of_pair(pair: dict, device: str) -> tuple[dict, dict]:
    """(engine mapping, provider mapping) for one measured pair of the card: the EngineSpec the pair
    ran with, as the card stored it (nothing is read back out of a command line)."""
    dep = deployment_of(pair, device)
    return dep["engine"], dep["provider"]


def failed_start(card: dict | None, name: str, kind: str) -> str | None:
    """The engine's own message when the matrix saw `kind` fail to load candidate `name`."""
    for c in (card or {}).get("matrix", []):
        if c["artifact"]["name"] == name and c.get("engine_kind") == kind and (c.get("observed") or {}).get("loads") is False:
            return c["observed"].get("reason") or "the engine did not start (see the card)"
    return None


def from_card(card: dict, name: str) -> EngineChoice | None:
    """The card's row for candidate `name`: the recommendation when it is this candidate's, else
    this candidate's best-ranked pair; None when the card measured no pair of it."""
    device = (card.get("constraints") or {}).get("device", "cpu")
    goal = (card.get("goal") or {}).get("kind", "latency")
    min_att = card_attainment(card)
    mine = [p for p in card.get("pairs", []) if p["artifact"]["name"] == name]
    ranked, _ = rank(mine, goal, min_att)
    if not ranked:  # every measured pair of it answered wrongly on its engine: refused, not served in process
        failed = [p for p in mine if p.get("measured") and engine_refusal(p)]
        if not failed:
            return None
        best = failed[0]
        engine, provider = engine_of_pair(best, device)
        source = f"engine card: row '{pair_id(best)}'"
        return EngineChoice({**engine, "source": source}, provider, source, engine_refusal(best))
    rec = (card.get("recommendation") or {}).get("recommended")
    best = next((p for p in ranked if pair_id(p) == rec), ranked[0])
    why = "the card's recommendation" if pair_id(best) == rec else (
        f"{name}'s best-ranked row (the card recommends {rec})" if rec else f"{name}'s best-ranked row")
    engine, provider = engine_of_pair(best, device)
    source = f"engine card: row '{pair_id(best)}', {why}"
    return EngineChoice({**engine, "source": source}, provider, source, engine_refusal(best))


def for_choice(text: str, art: Artifact, card: dict | None = None, device: str = "cpu",
               port: int = DEFAULT_PORT) -> EngineChoice:
    """`--engine TEXT` for artifact `art`: the engine's command line as the matrix would start it,
    refused when the matrix saw it fail on this artifact or the format table rules it out."""
    kind, url = parse_choice(text)
    source = f"--engine {text}"
    if kind == "openai":
        engine = {"kind": "openai", "source": source}
        provider = {"kind": "openai", "base_url": url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1"),
                    "model": art.name}
        return EngineChoice(engine, provider, source)
    sup = expected(kind, art, device)
    graded = next((engine_refusal(p) for p in (card or {}).get("pairs", [])
                   if p["artifact"]["name"] == art.name and p.get("engine_kind") == kind and engine_refusal(p)), None)
    refused = failed_start(card, art.name, kind) or graded or (
        f"{kind} does not serve {art.label} on {device}: {sup.reason}" if sup.status == "no" else None)
    if KINDS[kind].provider == "local":
        engine = {"kind": kind, "device": device, "kernel": sup.kernel, "source": source}
        return EngineChoice(engine, {"kind": "local", "model": art.path, "device": device}, source, refused)
    spec = EngineSpec(kind=kind, device=device)
    python, origin = engine_python(kind, spec)
    notes = [] if python.is_file() else [f"{kind}'s interpreter {python} (from {origin}) does not exist here yet; "
                                         "the serving machine needs it"]
    resolved = spec.resolved_for(art, str(python))
    engine = {**resolved.model_dump(mode="json"), "port": port, "kernel": sup.kernel, "source": source}
    provider = {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": art.name}
    return EngineChoice(engine, provider, source, refused, notes)


def choose(art: Artifact, card: dict | None, engine: str | None, device: str = "cpu") -> EngineChoice | None:
    """--engine when given; else the card's row for this candidate; None: keep the default (in-process)."""
    if engine:
        return for_choice(engine, art, card, device)
    return from_card(card, art.name) if card else None  # a measured row started: nothing to refuse
