"""The `mixed` candidate: each unit of linears at the bit width it can bear, within a budget.

Three steps, one per module: the sensitivity table (sensitivity.py, cached per model and
calibration), the exact allocation (allocate.py, pure), and a standard checkpoint written by the
chosen algorithm with per-module overrides in GPTQModel's `dynamic` rules, which GPTQModel and
vLLM both read: `+:<regex>: {bits: 8}` for a unit above the base width, `-:<regex>` for one left
in 16-bit. The bit map, the budget it met and the predicted loss go into candidate.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from ..errors import QuantgateError
from ..util import atomic_write_json
from .. import allocation as allocate
from .base import QuantizeContext, QuantizeOutcome, layer_linears, skip_matcher
from .sensitivity import FILE as SENSITIVITY_FILE
from .sensitivity import cached_or_measure, unit_losses


def source_linears(source: Path) -> tuple[list[allocate.Linear], int]:
    """The decoder linears of a checkpoint folder (shapes from the safetensors headers, no weights
    read) and the 16-bit bytes of everything else a weight-only checkpoint keeps dense."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shapes[k] = (list(sl.get_shape()), sl.get_dtype())
    config = json.loads((Path(source) / "config.json").read_text())
    names = layer_linears({k: _Shaped(s) for k, (s, _) in shapes.items()})
    linears = [allocate.Linear(n, *shapes[f"{n}.weight"][0]) for n in names]
    inside = {f"{n}.weight" for n in names}
    fixed = 0
    for k, (shape, dtype) in shapes.items():
        if k in inside or (k == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        n = 1
        for d in shape:
            n *= d
        fixed += (2 * n if dtype.startswith(("F", "BF")) else n * 4) + allocate.HEADER_BYTES_PER_TENSOR
    return linears, fixed


class _Shaped:
    """Just enough of a tensor for layer_linears (it asks for dim())."""

    def __init__(self, shape):
        self.shape = shape

    def dim(self):
        return len(self.shape)


def plan_for(spec, source: Path) -> allocate.Plan:
    linears, fixed = source_linears(source)
    return allocate.make_plan(linears, spec.choices, spec.group_size, skip_matcher(spec.skip), fixed)


class MixedQuantizer:
    name = "quantgate-mixed"

    def quantize(self, spec, ctx: QuantizeContext, out: Path) -> QuantizeOutcome:
        if not ctx.calibration:
            raise QuantgateError(f"candidate '{spec.name}': a mixed candidate needs calibration data")
        plan = plan_for(spec, ctx.source)
        if problem := allocate.budget_problem(plan, spec.budget.kind, spec.budget.value):
            raise QuantgateError(f"candidate '{spec.name}': budget.{spec.budget.kind}: {problem}")
        windows = ctx.calibration[: spec.sensitivity_samples]
        targets = [m.name for u in plan.units for m in u.linears]
        table = cached_or_measure(source=ctx.source, windows=windows, choices=spec.choices,
                                  group_size=spec.group_size, sym=spec.sym, targets=targets,
                                  model_id=ctx.model_identity, calib_hash=ctx.calib_hash, artifacts=ctx.artifacts,
                                  log=ctx.progress.log, load_kwargs=ctx.load_kwargs())
        losses = unit_losses(table, plan.units)
        bits = allocate.allocate(plan, losses, spec.budget.kind, spec.budget.value)
        default = allocate.default_bits(bits)
        rules = allocate.dynamic_rules(bits, default)
        summary = allocate.summary(plan, bits)
        ctx.progress.log(f"mixed {spec.name}: {summary['units_per_bits']} units per width, "
                         f"{summary['size_mb']} MB predicted, {summary['avg_bits']} bits on average")
        fmt = self._write(spec, ctx, out, bits, default, rules)
        atomic_write_json(out / SENSITIVITY_FILE, {k: v for k, v in table.items() if k != "cached"})
        record = {"mixed": {
            "algorithm": spec.algorithm, "budget": {spec.budget.kind: spec.budget.value}, "base_bits": default,
            "bits": bits, **summary,
            "predicted_loss_increase": round(sum(losses[u][b] for u, b in bits.items()), 6),
            "predicted_loss_increase_all_lowest": round(sum(v[plan.choices[0]] for v in losses.values()), 6),
            "sensitivity": {"measure": table["measure"], "key": table.get("key"), "windows": table["windows"],
                            "tokens": table["tokens"], "wall_s": table["wall_s"], "cached": table["cached"]},
        }}
        how = "cached" if table["cached"] else f"measured in {table['wall_s']} s"
        notes = [f"mixed: sensitivity {how}; allocation {summary['units_per_bits']} units per width"]
        return QuantizeOutcome(format=fmt, record=record, notes=notes,
                               backend_versions=self._versions(spec))

    def _write(self, spec, ctx, out, bits, default, rules) -> str:
        if spec.algorithm == "rtn":
            from .rtn import gptq_quantization_config, write_rtn

            skipped = skip_matcher(spec.skip)

            def bits_of(name):
                b = bits.get(allocate.unit_name(name))
                return None if skipped(name) or b is None or b >= allocate.UNQUANTIZED else b

            def config_for(linears):
                base = SimpleNamespace(bits=default, group_size=spec.group_size, sym=spec.sym)
                cfg = gptq_quantization_config(base, skipped_modules=[n for n in linears if skipped(n)])
                cfg["dynamic"] = {**rules, **cfg.get("dynamic", {})}
                cfg["meta"] = {"quantizer": ["quantgate-mixed"]}
                return cfg

            write_rtn(ctx, out, bits_of, spec.group_size, spec.sym, config_for, label=f"RTN {spec.name}")
            return "gptq"
        from ..recipe import AWQSpec, GPTQSpec
        from .gptqmodel_backend import GPTQModelQuantizer

        common = {"name": spec.name, "bits": default, "group_size": spec.group_size, "sym": spec.sym,
                  "skip": spec.skip, "n_samples": spec.n_samples}
        inner = GPTQSpec(method="gptq", act_order=spec.act_order, damp_percent=spec.damp_percent, **common) \
            if spec.algorithm == "gptq" else AWQSpec(method="awq", **common)
        return GPTQModelQuantizer().quantize(inner, ctx, out, dynamic=rules).format

    @staticmethod
    def _versions(spec) -> dict:
        if spec.algorithm == "rtn":
            return {}
        import gptqmodel

        return {"gptqmodel": gptqmodel.__version__}
