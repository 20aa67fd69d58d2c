"""A tiny OpenAI-compatible "engine" for launcher tests: started the way quantgate starts vLLM or
llama.cpp (`python -m <module> --model X --port P ...`), it logs like them and streams tokens.

Behaviour from flags (unknown engine flags are ignored):
  --fail MSG         log a few lines and a traceback ending in MSG, exit 1 (a failed start)
  --ready-after S    wait S seconds before listening (a slow warm-up)
  --never-ready      log, then never listen
  --ignore-term      ignore SIGTERM (the launcher must SIGKILL)
  --spawn-child      fork a worker process that sleeps (the launcher must reap it too)
  --tpot-ms MS       pause between streamed tokens
  --slots N          answer at most N requests at once; the others wait their turn (a server with a
                     capacity: past it, the queue grows and TTFT with it)
  --crash-after N    exit (code 3, the whole process at once) when the (N+1)-th chat request arrives
  --pid-file PATH    append this process's pid to PATH at start (tests check what was spawned)
  --reply TEXT       the first word of every answer (tells deployments apart)
With VLLM_API_KEY (or API_KEY) set, every /v1 request without `Authorization: Bearer KEY` gets a 401.
OpenAI-compatible: /v1/chat/completions answers JSON with usage, or SSE (`stream: true`, usage in
the last chunk when `stream_options.include_usage`); /v1/models; /health; /metrics.
With `-m llama_cpp.server`, a --model that is not a .gguf file fails as llama.cpp does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", dest="module", default="fake")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="model")
    ap.add_argument("--served-model-name", "--model_alias", dest="name", default=None)
    ap.add_argument("--fail", default=None)
    ap.add_argument("--ready-after", type=float, default=0.0)
    ap.add_argument("--never-ready", action="store_true")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--spawn-child", action="store_true")
    ap.add_argument("--tpot-ms", type=float, default=1.0)
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--crash-after", type=int, default=None)
    ap.add_argument("--pid-file", default=None)
    ap.add_argument("--reply", default="t")
    a, _unknown = ap.parse_known_args()
    name = a.name or a.model
    log = lambda s: print(s, flush=True)
    if a.pid_file:
        with open(a.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")
    log(f"INFO 01-01 00:00:00 [fake.py:1] starting {a.module} on {a.model}")
    log(f"INFO 01-01 00:00:00 [fake.py:1] VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}")
    if a.module.startswith("llama_cpp") and not a.model.endswith(".gguf"):
        log(f"gguf_init_from_file_impl: failed to read magic from {a.model}")
        log("llama_model_load: error loading model: llama_model_loader: failed to load model from " + a.model)
        log("ValueError: Failed to load model from file: " + a.model)
        sys.exit(1)
    if a.fail:
        log("WARNING 01-01 00:00:01 [fake.py:2] some option is not supported, falling back")
        log("Traceback (most recent call last):")
        log('  File "fake.py", line 10, in <module>')
        log(a.fail)
        log("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}")
        sys.exit(1)
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if a.spawn_child:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    if a.never_ready:
        while True:
            time.sleep(1)
    if a.ready_after:
        time.sleep(a.ready_after)
    if a.module.startswith("vllm"):
        log("INFO 01-01 00:00:02 [auto_gptq.py:352] Using FakeW4A16LinearKernel for AutoGPTQLinearMethod")
    else:
        log("print_info: file type   = Q4_1")

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}]})

    async def metrics(_):
        return web.Response(text="# fake metrics\nfake_requests_total 0\n")

    served = [0]

    async def health(_):
        return web.Response(text="")

    slots = asyncio.Semaphore(a.slots) if a.slots else None

    async def chat(request):
        if slots is None:
            return await answer(request)
        async with slots:
            return await answer(request)

    async def answer(request):
        served[0] += 1
        log(f"INFO chat request {served[0]}")
        if a.crash_after is not None and served[0] > a.crash_after:
            log(f"fatal: crashing after {a.crash_after} requests (--crash-after)")
            os._exit(3)
        body = await request.json()
        n = int(body.get("max_tokens") or 8)
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []) // 4 + 1
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        words = [f"{a.reply}{i} " for i in range(n)]
        if not body.get("stream"):
            await asyncio.sleep(a.tpot_ms * n / 1000)
            return web.json_response({"id": "fake", "object": "chat.completion", "model": name, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                 "finish_reason": "length"}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, w in enumerate(words):
            await asyncio.sleep(a.tpot_ms / 1000)
            last = i == n - 1
            chunk = {"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": "length" if last else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage", True):
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    # like vLLM's --api-key (VLLM_API_KEY) and llama-cpp-python's api_key (API_KEY): /v1 wants the key
    key = os.environ.get("VLLM_API_KEY") or os.environ.get("API_KEY")

    @web.middleware
    async def auth(request, handler):
        if key and request.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    app = web.Application(middlewares=[auth])
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    log(f"INFO: listening on {a.host}:{a.port} (pid {os.getpid()})")
    web.run_app(app, host=a.host, port=a.port, print=None, handle_signals=not a.ignore_term)


if __name__ == "__main__":
    main()
