"""Perplexity evaluation throughput: quantgate's batched windows vs a one-window-at-a-time loop.

Same model, same windows, measured side by side in one run (after a warm-up of each), so the
ratio is what to read; absolute tokens/s drift on a shared machine.

    .venv/bin/python bench/perplexity.py [--model FOLDER] [--windows 16] [--seq-len 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as quantgate's CLI does, before torch loads


def one_at_a_time(model, windows):
    import torch

    nll, n = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        with torch.inference_mode():
            out = model(input_ids=ids, labels=ids)
        nll += out.loss.item() * (len(w) - 1)
        n += len(w) - 1
    return math.exp(nll / n), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "perplexity.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import load_model, perplexity, perplexity_windows
    from quantgate.models import resolve
    from quantgate.recipe import DEFAULT_MODEL, PerplexitySpec
    from quantgate.util import atomic_write_json

    folder = args.model or resolve(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder)
    windows = perplexity_windows(tok, PerplexitySpec(seq_len=args.seq_len, max_windows=args.windows))
    perplexity(model, windows[:args.batch], args.batch)  # warm-up
    one_at_a_time(model, windows[:1])

    t = time.perf_counter()
    batched = perplexity(model, windows, args.batch)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    ppl_loop, n = one_at_a_time(model, windows)
    t_loop = time.perf_counter() - t

    res = {"windows": len(windows), "seq_len": args.seq_len, "batch": args.batch, "tokens": n,
           "batched": {"tok_s": batched.tokens_scored / t_batched, "perplexity": batched.perplexity},
           "loop": {"tok_s": n / t_loop, "perplexity": ppl_loop}}
    res["speedup"] = res["batched"]["tok_s"] / res["loop"]["tok_s"]
    atomic_write_json(Path(args.out), res)
    print(f"{'':12}{'tokens/s':>10}{'perplexity':>12}")
    print(f"{'batched':12}{res['batched']['tok_s']:10.0f}{batched.perplexity:12.4f}")
    print(f"{'one-by-one':12}{res['loop']['tok_s']:10.0f}{ppl_loop:12.4f}")
    print(f"speedup {res['speedup']:.2f}x on {len(windows)} windows × {args.seq_len} tokens; written {args.out}")


if __name__ == "__main__":
    main()
