"""In-process transformers on the manifest's checkpoint, CPU or CUDA.

torch and transformers are imported when this provider starts, never before, so a gateway in
front of a remote engine does not pay for them. Generation runs on one worker thread (a model
generates one request at a time; queueing is the gateway's job), and checks a stop flag between
tokens: when the request's deadline cancels the call, the thread stops at the next token instead
of finishing a generation nobody will read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from ...kernels import arithmetic_problems, dtype_of, kernels_of, load_causal_lm
from .base import GenRequest, GenResult, Provider, ProviderError, StreamStats

log = logging.getLogger("quantgate.serve")


class LocalProvider(Provider):
    kind = "local"

    def __init__(self, deployment):
        super().__init__(deployment)
        self.path = self.spec.model or deployment.artifact
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"local-{deployment.name}")
        self.model = self.tok = self.torch = None
        self.counter = None  # a tokenizer of its own for the event loop: the worker thread uses self.tok
        self.device = "cpu"
        self.arithmetic: dict | None = None  # the dtype and kernels it loaded with (in /readyz)
        self.problems: list[str] = []  # how that differs from the deployment's evaluated arithmetic

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        from ...errors import require

        torch = require("torch", what="the local provider", extra="models")
        transformers = require("transformers", what="the local provider", extra="models")
        dev = self.spec.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        # the dtype and the kernel rule the evaluation used (quantgate.kernels): the gated arithmetic,
        # loaded as the evaluation loads it (per-module bits through GPTQModel, kept dequantized weights,
        # float32 linears where bfloat16 is emulated)
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(self.path)
            self.counter = transformers.AutoTokenizer.from_pretrained(self.path)
            self.model = load_causal_lm(self.path, None if self.spec.dtype == "auto" else self.spec.dtype, dev)
        except (OSError, ValueError) as exc:
            raise ProviderError("unavailable", f"cannot load checkpoint {self.path}: {exc}") from None
        self.torch, self.device = torch, dev
        self.arithmetic = {"dtype": dtype_of(self.model), "kernels": kernels_of(self.model)}
        evaluated = getattr(self.deployment, "evaluated", None)
        self.problems = arithmetic_problems(evaluated.model_dump(), self.arithmetic) if evaluated else []
        if self.problems:
            log.warning("%s is not served on the arithmetic its gates were measured on: %s",
                        self.deployment.key, "; ".join(self.problems))

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.model = None

    async def ready(self) -> tuple[bool, str]:
        if self.model is None:
            return False, "not loaded"
        a = self.arithmetic or {}
        kernels = ", ".join(sorted(a.get("kernels") or {})) or "dense"
        note = f"; NOT the gated arithmetic: {'; '.join(self.problems)}" if self.problems else ""
        return True, f"{self.path} on {self.device} in {a.get('dtype')} ({kernels}){note}"

    @staticmethod
    def _text(tok, req: GenRequest) -> str:
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        return req.prompt()

    def _encode(self, req: GenRequest):
        return self.tok(self._text(self.tok, req), return_tensors="pt").to(self.device)

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        if self.counter is None:
            return None
        return len(self.counter(self._text(self.counter, GenRequest(messages, 1)))["input_ids"])

    def _run(self, req: GenRequest, stop: threading.Event, streamer=None):
        import transformers

        class _Stop(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return stop.is_set()

        enc = self._encode(req)
        n = min(req.max_tokens, self.spec.max_new_tokens)
        sample = bool(req.temperature)
        kw = dict(max_new_tokens=n, do_sample=sample, streamer=streamer,
                  stopping_criteria=transformers.StoppingCriteriaList([_Stop()]),
                  pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id)
        if sample:
            kw["temperature"] = req.temperature
            if req.top_p is not None:
                kw["top_p"] = req.top_p
        with self.torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        new = out[0, enc["input_ids"].shape[1]:]
        return enc["input_ids"].shape[1], new, n

    async def generate(self, req: GenRequest) -> GenResult:
        stop = threading.Event()
        t0 = time.perf_counter()
        try:
            n_in, new, cap = await asyncio.get_running_loop().run_in_executor(self._pool, self._run, req, stop, None)
        finally:
            stop.set()  # a cancelled call stops the thread at its next token
        text = self.tok.decode(new, skip_special_tokens=True)
        return GenResult(text=text, tokens_in=int(n_in), tokens_out=int(new.shape[0]),
                         finish_reason="length" if new.shape[0] >= cap else "stop",
                         ttft_ms=0.0, generation_ms=(time.perf_counter() - t0) * 1000)

    async def stream(self, req: GenRequest, stats: StreamStats) -> AsyncIterator[str]:
        import transformers

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        streamer = transformers.TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)

        def pump():  # on a helper thread: move pieces from the streamer to the event loop
            for piece in streamer:
                loop.call_soon_threadsafe(q.put_nowait, piece)

        done = loop.run_in_executor(self._pool, self._run, req, stop, streamer)
        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        try:
            while True:
                getter = asyncio.ensure_future(q.get())
                finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    piece = getter.result()
                    if stats.t_first is None:
                        stats.t_first = time.perf_counter()
                    yield piece
                    continue
                getter.cancel()
                n_in, new, cap = done.result()
                await loop.run_in_executor(None, pumper.join)
                while not q.empty():
                    yield q.get_nowait()
                stats.tokens_in, stats.tokens_out = int(n_in), int(new.shape[0])
                stats.finish_reason = "length" if new.shape[0] >= cap else "stop"
                return
        finally:
            stop.set()
