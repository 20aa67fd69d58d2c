"""Per-unit sensitivity: how much the calibration loss is predicted to rise when one unit alone is
quantized at each bit choice — what a mixed candidate's allocation (allocate.py) minimises.

The measure (MEASURE): one forward and backward pass of the unquantized model over the calibration
windows collects, for every linear, its inputs' second moment H = Σₜ xₜxₜᵀ (GPTQ's Hessian) and the
squared gradient of the summed token loss at each output channel, Fᵢ = Σₜ gₜᵢ². Quantizing W to
Q(W) moves the output by ΔW·x; to second order, with the empirical Fisher's diagonal and gradient
and error decoupled over tokens, the mean loss rises by

    ΔL ≈ Σᵢ Fᵢ · (ΔW H ΔWᵀ)ᵢᵢ / (2 T²)          (T tokens)

in nats, comparable across layers (unlike a layer's own output error), and additive over units
(a first-order assumption the evaluation then checks). ΔW is the round-to-nearest error at the
candidate's group size and symmetry: exact for `algorithm: rtn`, an upper proxy for GPTQ.

Computed once per (model, calibration, choices, group size, symmetry, windows) and cached in the
workspace's artifacts folder like a candidate (sensitivity-<key>/sensitivity.json), so a second
mixed candidate with another budget or algorithm reuses it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..recipe import stable_hash
from ..util import atomic_write_json
from ..workspace import read_json
from ..allocation import UNQUANTIZED, unit_name

MEASURE = "fisher-output-rtn-v1"
FILE = "sensitivity.json"


def sensitivity_key(model_id: str, calib_hash: str, choices, group_size: int, sym: bool, windows: int) -> str:
    return stable_hash({"measure": MEASURE, "model": model_id, "calib": calib_hash, "choices": sorted(set(choices)),
                        "group_size": group_size, "sym": sym, "windows": windows})


def cache_folder(artifacts: Path, key: str) -> Path:
    return Path(artifacts) / f"sensitivity-{key[:16]}"


def cached_or_measure(*, source: Path, windows: list[list[int]], choices, group_size: int, sym: bool,
                      targets: list[str], model_id: str | None, calib_hash: str | None,
                      artifacts: Path | None, log=print, load_kwargs: dict | None = None) -> dict:
    """The sensitivity table, from the cache when this model × calibration × choices was measured."""
    key = sensitivity_key(model_id or "?", calib_hash or "?", choices, group_size, sym, len(windows))
    cacheable = bool(model_id and calib_hash and artifacts)
    path = cache_folder(artifacts, key) / FILE if cacheable else None
    if path is not None and (hit := read_json(path)) is not None and set(targets) <= set(hit["linears"]):
        log(f"sensitivity: cached ({path})")
        return {**hit, "cached": True}
    table = measure(source, windows, choices, group_size, sym, targets, log=log, load_kwargs=load_kwargs)
    table.update(key=key, model=model_id, calib_hash=calib_hash)
    if path is not None:
        atomic_write_json(path, table)
    return {**table, "cached": False}


def measure(source: Path, windows: list[list[int]], choices, group_size: int, sym: bool, targets: list[str],
            *, batch: int = 4, log=print, load_kwargs: dict | None = None) -> dict:
    """One forward + backward over `windows`, then ΔL per unit and choice (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .rtn import fake_quantize

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **(load_kwargs or {})).eval()
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    hess: dict[str, torch.Tensor] = {}   # per unit: its members share their input
    fisher: dict[str, torch.Tensor] = {}  # per linear: Σ g² per output channel
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))]

    def hook(name: str, unit: str, first: bool):
        def on_forward(mod, inputs, output):
            if first:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                hess[unit] = hess.get(unit, 0) + x.T @ x

            def on_grad(g):
                sq = g.detach().reshape(-1, g.shape[-1]).pow(2).sum(0)
                fisher[name] = fisher.get(name, 0) + sq
            output.register_hook(on_grad)
        return on_forward

    seen_units: set[str] = set()
    for name in targets:
        unit = unit_name(name)
        handles.append(modules[name].register_forward_hook(hook(name, unit, unit not in seen_units)))
        seen_units.add(unit)
    tokens, loss_sum, predicted = 0, 0.0, 0
    for i in range(0, len(windows), batch):
        ids = torch.tensor(windows[i: i + batch])
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        tokens += ids.numel()
        predicted += ids[:, 1:].numel()
        loss_sum += float(loss.detach())
    for h in handles:
        h.remove()
    t_pass = time.perf_counter() - t0
    scores: dict[str, dict[str, float]] = {}
    norm = 2.0 * predicted * predicted
    with torch.no_grad():
        for name in targets:
            w = modules[name].weight.float()
            h = hess[unit_name(name)]
            row = {}
            for b in sorted(set(choices)):
                if b >= UNQUANTIZED:
                    row[str(b)] = 0.0
                    continue
                dw = w - fake_quantize(w, b, group_size, sym).float()
                err = ((dw @ h) * dw).sum(1)  # (ΔW H ΔWᵀ)ᵢᵢ: squared output error per channel, summed over tokens
                row[str(b)] = float((fisher[name] * err).sum() / norm)
            scores[name] = row
    wall = time.perf_counter() - t0
    log(f"sensitivity: {len(targets)} linears × {len(set(choices))} choices on {len(windows)} windows "
        f"({tokens} tokens) in {wall:.1f} s (forward+backward {t_pass:.1f} s)")
    return {"measure": MEASURE, "choices": sorted(set(choices)), "group_size": group_size, "sym": sym,
            "windows": len(windows), "tokens": tokens, "base_loss": loss_sum / max(predicted, 1),
            "linears": list(targets), "scores": scores, "wall_s": round(wall, 2)}


def unit_losses(table: dict, units) -> dict[str, dict[int, float]]:
    """Per unit and bit width: the summed ΔL of its linears (the allocation's loss table)."""
    out = {}
    for u in units:
        out[u.name] = {int(b): sum(table["scores"][m.name][str(b)] for m in u.linears) for b in table["choices"]}
    return out
