"""Pure: how many bytes each layer costs at each bit width, and the exact allocation under a budget.

A mixed candidate gives every *unit* (the linears a serving engine fuses into one matmul, which
must share their precision: q/k/v, gate/up; see FUSED) one of the recipe's bit choices. The
allocation minimises the predicted loss increase (sensitivity.py) subject to a budget on the
checkpoint's size or on the average weight bits: a multiple-choice knapsack, solved exactly by
dynamic programming over the budget cut into `resolution` steps. Costs are rounded *up* to whole
steps, so a solution never exceeds the real budget; with integer costs and a step of 1 the
optimum is exact (tests/test_mixed.py checks it against brute force).

No torch and nothing of quantgate here (layer 1): the same size model validates a recipe from
config.json before any work starts (validate.py) and sizes the checkpoint the quantizer writes
(quantize/mixed.py).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable

UNQUANTIZED = 16  # the "bit choice" that leaves a unit in 16-bit floats (GPTQModel's `-:` rule)

# linears that engines fuse into one matmul (vLLM's packed_modules_mapping): one unit, one precision
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@dataclass(frozen=True)
class Linear:
    name: str  # module name, e.g. model.layers.3.mlp.down_proj
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Unit:
    """Linears that get one precision: a fused group, or a lone linear."""

    name: str  # e.g. model.layers.3.self_attn.qkv_proj
    linears: tuple[Linear, ...]

    @property
    def params(self) -> int:
        return sum(m.params for m in self.linears)


def unit_name(module: str) -> str:
    head, _, last = module.rpartition(".")
    return f"{head}.{FUSED[last]}" if last in FUSED else module


def group_units(linears: list[Linear]) -> list[Unit]:
    """Linears → units, in the order their first member appears."""
    order: dict[str, list[Linear]] = {}
    for m in linears:
        order.setdefault(unit_name(m.name), []).append(m)
    return [Unit(n, tuple(ms)) for n, ms in order.items()]


# a safetensors header holds a JSON entry per tensor (name, dtype, shape, offsets): measured 108 bytes
# on average for SmolLM2's GPTQ checkpoint; counted high so a predicted size stays an upper bound
HEADER_BYTES_PER_TENSOR = 128


def linear_bytes(m: Linear, bits: int, group_size: int) -> int:
    """Bytes of one linear in the GPTQ layout (qweight, qzeros, fp16 scales, int32 g_idx), or fp16,
    with its entries in the safetensors header."""
    if bits >= UNQUANTIZED:
        return 2 * m.params + HEADER_BYTES_PER_TENSOR
    groups = 1 if group_size == -1 else m.in_features // group_size
    qweight = math.ceil(m.in_features * bits / 32) * 4 * m.out_features
    qzeros = groups * math.ceil(m.out_features * bits / 32) * 4
    return qweight + qzeros + groups * m.out_features * 2 + m.in_features * 4 + 4 * HEADER_BYTES_PER_TENSOR


def unit_bytes(u: Unit, bits: int, group_size: int) -> int:
    return sum(linear_bytes(m, bits, group_size) for m in u.linears)


# ------------------------------------------------------------------------------ the budget
@dataclass(frozen=True)
class Plan:
    """The problem: units, choices, and what is fixed besides them (embeddings, norms, skipped linears)."""

    units: tuple[Unit, ...]
    choices: tuple[int, ...]  # ascending
    group_size: int
    fixed_bytes: int = 0

    def size_bytes(self, bits: dict[str, int]) -> int:
        return self.fixed_bytes + sum(unit_bytes(u, bits[u.name], self.group_size) for u in self.units)

    def avg_bits(self, bits: dict[str, int]) -> float:
        total = sum(u.params for u in self.units)
        return sum(u.params * bits[u.name] for u in self.units) / total if total else 0.0

    def uniform(self, b: int) -> dict[str, int]:
        return {u.name: b for u in self.units}

    def size_range_mb(self) -> tuple[float, float]:
        return (self.size_bytes(self.uniform(self.choices[0])) / 1e6,
                self.size_bytes(self.uniform(self.choices[-1])) / 1e6)

    def costs(self, kind: str) -> list[list[int]]:
        """Per unit, per choice: bytes (kind 'size_mb') or parameter-bits (kind 'bits')."""
        if kind == "bits":
            return [[u.params * b for b in self.choices] for u in self.units]
        return [[unit_bytes(u, b, self.group_size) for b in self.choices] for u in self.units]

    def capacity(self, kind: str, value: float) -> int:
        """The budget in the units of costs(kind)."""
        if kind == "bits":
            return math.floor(value * sum(u.params for u in self.units))
        return math.floor(value * 1e6) - self.fixed_bytes


def budget_problem(plan: Plan, kind: str, value: float) -> str | None:
    """Why a budget cannot be met or is pointless (with the range that would work), else None."""
    lo, hi = plan.choices[0], plan.choices[-1]
    if kind == "bits":
        if not lo <= value <= hi:
            return (f"{value:g} bits is outside what the choices can make; budgets that work: {lo}–{hi} bits "
                    f"(every layer at {lo} to every layer at {hi})")
        return None
    smin, smax = plan.size_range_mb()
    if value < smin:
        return (f"{value:g} MB is below {smin:.1f} MB, the size with every layer at {lo} bits; sizes that "
                f"work: {smin:.1f}–{smax:.1f} MB")
    if value > smax:
        return (f"{value:g} MB is above {smax:.1f} MB, the size with every layer at {hi} bits (nothing left "
                f"to trade); sizes that work: {smin:.1f}–{smax:.1f} MB")
    return None


# ------------------------------------------------------------------------------ the solver
def solve(costs: list[list[int]], losses: list[list[float]], capacity: int, *,
          resolution: int = 20_000) -> list[int]:
    """Choice index per item minimising the total loss with total cost ≤ capacity (multiple-choice
    knapsack, exact DP). Costs are taken relative to each item's cheapest choice and cut into at most
    `resolution` steps of the spare capacity, rounded up. Deterministic: among equal totals the
    cheaper choice of the earlier item wins. Raises ValueError when even the cheapest choices overflow."""
    import numpy as np

    base = sum(min(c) for c in costs)
    spare = capacity - base
    if spare < 0:
        raise ValueError(f"the cheapest choices cost {base}, more than the capacity {capacity}")
    step = max(1, math.ceil(spare / resolution)) if spare else 1
    steps = spare // step
    inf = float("inf")
    best = np.zeros(steps + 1)  # best[k]: least loss using at most k steps (items so far)
    picks = []
    for cost, loss in zip(costs, losses):
        cheapest = min(cost)
        new = np.full(steps + 1, inf)
        pick = np.zeros(steps + 1, dtype=np.int16)
        for i in sorted(range(len(cost)), key=lambda i: (cost[i], i)):  # cheaper first: ties keep it
            w = math.ceil((cost[i] - cheapest) / step)
            if w > steps:
                continue
            cand = np.full(steps + 1, inf)
            cand[w:] = best[: steps + 1 - w] + loss[i]
            better = cand < new
            new[better] = cand[better]
            pick[better] = i
        best = new
        picks.append(pick)
    k = int(np.argmin(best))  # the fewest steps reaching the least loss
    out = []
    for cost, pick in zip(reversed(costs), reversed(picks)):
        i = int(pick[k])
        out.append(i)
        k -= math.ceil((cost[i] - min(cost)) / step)
    return out[::-1]


def allocate(plan: Plan, losses: dict[str, dict[int, float]], kind: str, value: float,
             resolution: int = 20_000) -> dict[str, int]:
    """Bits per unit for a budget of `value` (MB, or average bits): the least predicted loss."""
    problem = budget_problem(plan, kind, value)
    if problem:
        raise ValueError(problem)
    table = [[float(losses[u.name][b]) for b in plan.choices] for u in plan.units]
    idx = solve(plan.costs(kind), table, plan.capacity(kind, value), resolution=resolution)
    return {u.name: plan.choices[i] for u, i in zip(plan.units, idx)}


# ------------------------------------------------------------------- the checkpoint's rules
def dynamic_rules(bits: dict[str, int], default: int) -> dict[str, dict]:
    """GPTQModel's `dynamic` (which vLLM reads too): `+:` regex → overrides, `-:` → left in 16-bit.
    Each unit's pattern matches its own linears and the fused module engines build from them
    (vLLM matches the fused name, e.g. ...self_attn.qkv_proj), anchored so layer 1 never matches 10."""
    rules = {}
    for unit, b in bits.items():
        if b == default:
            continue
        head, _, last = unit.rpartition(".")
        members = sorted({k for k, v in FUSED.items() if v == last}) + [last] if last in FUSED.values() else [last]
        pattern = f"^{re.escape(head)}\\.({'|'.join(members)})$" if len(members) > 1 else f"^{re.escape(unit)}$"
        rules[("-:" if b >= UNQUANTIZED else "+:") + pattern] = {} if b >= UNQUANTIZED else {"bits": b}
    return rules


def default_bits(bits: dict[str, int]) -> int:
    """The checkpoint's base `bits`: the quantized width covering the most units (fewest rules)."""
    quantized = [b for b in bits.values() if b < UNQUANTIZED]
    if not quantized:
        return 4
    return max(sorted(set(quantized)), key=quantized.count)


def summary(plan: Plan, bits: dict[str, int]) -> dict:
    """What a record says about an allocation: units per width, size, average bits."""
    counts = {str(b): sum(1 for v in bits.values() if v == b) for b in plan.choices}
    return {"units_per_bits": counts, "size_mb": round(plan.size_bytes(bits) / 1e6, 2),
            "avg_bits": round(plan.avg_bits(bits), 3)}


# ------------------------------------------------------------------------------ the shapes
def llama_linears(config: dict) -> list[Linear]:
    """A llama-like decoder's linears from its config.json (what validation sizes before any work)."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or hidden // heads)
    shapes = {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
              "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return [Linear(f"model.layers.{i}.{k}", o, n) for i in range(int(config["num_hidden_layers"]))
            for k, (o, n) in shapes.items()]


def llama_fixed_bytes(config: dict) -> int:
    """16-bit bytes of what a weight-only checkpoint keeps dense: embeddings, norms, an untied head."""
    hidden, vocab, layers = int(config["hidden_size"]), int(config["vocab_size"]), int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings"))
    embed = vocab * hidden * (1 if tied else 2)
    tensors = (1 if tied else 2) + 2 * layers + 1
    return 2 * (embed + (2 * layers + 1) * hidden) + tensors * HEADER_BYTES_PER_TENSOR


def skip_matcher(patterns: list[str]) -> Callable[[str], bool]:
    """True for module names matched by a skip pattern: a glob, or a name suffix like 'down_proj'."""

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) or name.endswith("." + p) or name == p for p in patterns)

    return skipped


def make_plan(linears: list[Linear], choices, group_size: int, skipped, fixed_bytes: int) -> Plan:
    """The allocation problem: linears matched by `skipped` stay 16-bit and count as fixed bytes."""
    kept = [m for m in linears if not skipped(m.name)]
    fixed = fixed_bytes + sum(linear_bytes(m, UNQUANTIZED, group_size) for m in linears if skipped(m.name))
    return Plan(tuple(group_units(kept)), tuple(sorted(set(choices))), group_size, fixed)
