"""Quality metrics. Perplexity uses fixed, non-overlapping windows of held-out text, identical
for every candidate, so differences come from the weights alone."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..data import split_documents, token_stream
from ..errors import QuantgateError
from ..recipe import PerplexitySpec, SourceSpec, stable_hash


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_windows(tokenizer, spec: PerplexitySpec) -> list[list[int]]:
    """The first `max_windows` non-overlapping windows of the corpus's eval split (no sampling)."""
    src = SourceSpec(path=spec.path) if spec.path else SourceSpec(corpus=spec.corpus)
    stream = token_stream(split_documents(src, "eval"), tokenizer)
    n = min(spec.max_windows, len(stream) // spec.seq_len)
    if n == 0:
        raise QuantgateError(
            f"evaluation.perplexity: the eval split of {src.label} has {len(stream)} tokens, fewer than one "
            f"window of {spec.seq_len}; lower seq_len or give more held-out text")
    return [stream[i * spec.seq_len:(i + 1) * spec.seq_len] for i in range(n)]


def perplexity(model, windows: list[list[int]], batch_size: int = 4, progress=None) -> PerplexityResult:
    """exp(mean negative log-likelihood) over every next-token prediction inside the windows."""
    import torch

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in (progress(batches) if progress else batches):
        ids = torch.tensor(batch, dtype=torch.long, device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total_nll += nll.sum().item()
        total_tokens += nll.numel()
    mean = total_nll / max(total_tokens, 1)
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, tokens_scored=total_tokens, windows=len(windows),
        protocol={
            "window": len(windows[0]) if windows else 0, "stride": len(windows[0]) if windows else 0,
            "tokens_counted": "every token after the first in each window",
            "windows_hash": stable_hash(windows)[:16],
        },
    )


def load_model(folder, device: str = "cpu"):
    """Load any candidate checkpoint (dense, GPTQ, AWQ) with transformers and its quantized kernels."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map=device)
    model.eval()
    return model
