"""Where two stacks' perplexities of one checkpoint part: run this in each venv on the same windows.

    # in quantgate's venv: the windows the recipe's perplexity scores (from the checkpoint's tokenizer)
    python scripts/interop_probe.py windows recipes/smollm2-cpu.yaml ARTIFACT /tmp/w.json
    # in each venv (quantgate's, ~/.cache/quantgate/engines/interop-venv): perplexity, the quantized
    # kernels and their scales' dtype; --capture keeps a few layers' inputs/outputs for a diff
    python scripts/interop_probe.py ppl ARTIFACT bfloat16 /tmp/w.json [--backend torch] [--capture a.pt]
    python scripts/interop_probe.py diff a.pt b.pt

Self-contained on purpose (transformers 4.57 or 5, no quantgate import outside `windows`).
--backend picks GPTQModel's kernel (e.g. `torch`: dequantize to the model's dtype) where
transformers uses GPTQModel. Findings: tests/e2e/test_interop.py's docstring.
"""

from __future__ import annotations

import argparse
import collections
import json
import math

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.29.mlp.down_proj")


def windows(recipe: str, folder: str, out: str) -> None:
    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import perplexity_windows
    from quantgate.recipe import load_recipe

    w = perplexity_windows(AutoTokenizer.from_pretrained(folder), load_recipe(recipe).evaluation.perplexity)
    with open(out, "w") as f:
        json.dump(w, f)
    print(f"{len(w)} windows of {len(w[0])} tokens -> {out}")


def ppl(folder: str, dtype: str, windows_file: str, backend: str | None, capture: str | None, batch: int = 4) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    kw = {"torch_dtype" if transformers.__version__.startswith("4.") else "dtype": getattr(torch, dtype)}
    if backend:
        from transformers import AwqConfig, GPTQConfig

        with open(f"{folder}/config.json") as f:
            qc = json.load(f)["quantization_config"]
        make = AwqConfig if qc["quant_method"] == "awq" else GPTQConfig
        kw["quantization_config"] = make(bits=qc["bits"], backend=backend)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kw).eval()
    quant = [m for m in model.modules() if hasattr(m, "qweight")]
    caps: dict = {}
    mods = dict(model.named_modules())
    for name in (LAYERS if capture else ()):
        if name in mods:
            mods[name].register_forward_hook(
                lambda m, i, o, n=name: caps.setdefault(n, (i[0][:1, :8].float().clone(), o[:1, :8].float().clone())))
    with open(windows_file) as f:
        w = json.load(f)
    nll, n = 0.0, 0
    for i in range(0, len(w), batch):
        ids = torch.tensor(w[i:i + batch])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[:, :-1], dim=-1)
        tok = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll += tok.sum().item()
        n += tok.numel()
    if capture:
        torch.save(caps, capture)
    print(json.dumps({"perplexity": math.exp(nll / n), "transformers": transformers.__version__,
                      "model_dtype": str(model.dtype), "kernels": dict(collections.Counter(type(m).__name__ for m in quant)),
                      "scales_dtype": str(quant[0].scales.dtype) if quant and hasattr(quant[0], "scales") else None}))


def diff(a: str, b: str) -> None:
    import torch

    A, B = torch.load(a), torch.load(b)
    for k in A:
        if k in B:
            (ia, oa), (ib, ob) = A[k], B[k]
            print(f"{k}: inputs {((ia - ib).norm() / ib.norm()).item():.2e} outputs {((oa - ob).norm() / ob.norm()).item():.2e} relative")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("windows")
    s.add_argument("recipe"), s.add_argument("folder"), s.add_argument("out")
    s = sub.add_parser("ppl")
    s.add_argument("folder"), s.add_argument("dtype", choices=["float32", "float16", "bfloat16"]), s.add_argument("windows")
    s.add_argument("--backend"), s.add_argument("--capture")
    s = sub.add_parser("diff")
    s.add_argument("a"), s.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "windows":
        windows(args.recipe, args.folder, args.out)
    elif args.cmd == "ppl":
        ppl(args.folder, args.dtype, args.windows, args.backend, args.capture)
    else:
        diff(args.a, args.b)


if __name__ == "__main__":
    main()
