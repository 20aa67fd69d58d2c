"""In-process transformers engine: loads a candidate checkpoint (dense, GPTQ, AWQ) on CPU or CUDA
with whatever quantized kernels transformers picks there, and streams tokens as they are made.

One model serves one request at a time (a lock), as a single in-process replica does: under
concurrency the queueing shows up in TTFT, which is what a reviewer needs to see.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator

from ...kernels import kernels_of, load_causal_lm
from .base import Chunk, GenerationRequest


class _QueueStreamer:
    """A transformers streamer that hands each new token to an asyncio queue (thread-safe)."""

    def __init__(self, tokenizer, loop, queue):
        self.tok, self.loop, self.queue, self.prompt_seen = tokenizer, loop, queue, False

    def put(self, value):
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.loop.call_soon_threadsafe(self.queue.put_nowait,
                                    Chunk(text=self.tok.decode(ids, skip_special_tokens=True), tokens=len(ids)))

    def end(self):
        pass


class TransformersClient:
    name = "transformers"

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int | None = None,
                 dtype: str | None = None):
        # dtype None: whatever the checkpoint's config says (serving); evaluation passes one dtype
        # for every candidate so they are scored on the same arithmetic
        self.model_path, self.device, self.threads, self.dtype = str(model_path), device, threads, dtype
        self.model = self.tokenizer = None
        self._lock = asyncio.Lock()
        self.load_s: float | None = None

    async def start(self) -> None:
        t = time.perf_counter()
        await asyncio.to_thread(self._load)
        self.load_s = time.perf_counter() - t

    def _load(self):
        import torch
        from transformers import AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # quantgate.kernels: the rule the gateway's local provider shares; per-module bits load via GPTQModel
        self.model = load_causal_lm(self.model_path, self.dtype, self.device)

    def kernels(self) -> dict:
        """The classes doing the model's quantized matmuls and how many of each (a dense model: {}):
        evidence for the record of which arithmetic the scores came from (quantgate.kernels)."""
        return kernels_of(self.model)

    def encode(self, messages: list[dict]):
        if getattr(self.tokenizer, "chat_template", None):
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
        else:  # a base model without a chat template: plain concatenated text
            enc = self.tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")
        return enc.to(self.model.device)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            inputs = self.encode(req.messages)
            n_in = int(inputs["input_ids"].shape[1])
            done = object()
            errors: list[BaseException] = []

            def work():
                try:
                    self.model.generate(
                        **inputs, max_new_tokens=req.max_tokens, do_sample=False,
                        min_new_tokens=req.max_tokens if req.ignore_eos else None,
                        streamer=_QueueStreamer(self.tokenizer, loop, queue),
                        pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                    )
                except BaseException as exc:  # surfaced to the caller below
                    errors.append(exc)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, done)

            threading.Thread(target=work, daemon=True).start()
            n_out = 0
            while (item := await queue.get()) is not done:
                n_out += item.tokens or 0
                yield item
            if errors:
                raise errors[0]
            yield Chunk(usage={"prompt_tokens": n_in, "completion_tokens": n_out})

    async def close(self) -> None:
        self.model = None


@dataclass
class OfflineTimings:
    """Prefill and per-token decode time with warm-up, no queueing: the engine's floor."""

    prompt_tokens: int
    output_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def offline_timings(model, prompt_tokens: int = 256, output_tokens: int = 32, repeats: int = 3,
                    warmup: int = 1) -> OfflineTimings:
    """Median over `repeats` of a prefill forward and of a cached greedy decode, after `warmup` runs."""
    import statistics

    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab - 10, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    pre, dec = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(input_ids=ids)
            p = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_tokens,
                           min_new_tokens=output_tokens, do_sample=False, pad_token_id=0)
            g = time.perf_counter() - t
            if i >= warmup:
                pre.append(p)
                dec.append((g - p) / max(output_tokens - 1, 1))
    return OfflineTimings(prompt_tokens, output_tokens, 1000 * statistics.median(pre),
                          1000 * statistics.median(dec), repeats)
