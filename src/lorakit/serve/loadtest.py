"""A bounded loopback load test of ``lorakit serve``: many concurrent requests over random adapters while adapters
are loaded and unloaded; every greedy output is checked against a reference (the adapter merged into its own copy
of the base, generated alone). Used by ``bench/load_test.py`` (full size) and ``tests/serve`` (CI size).
"""
from __future__ import annotations

import asyncio
import copy
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

__all__ = ["reference_texts", "run_load_test"]


def reference_texts(base, tok, adapter_dirs: dict[str, Path | None], prompts: list[list[int]], max_tokens: int
                    ) -> dict[tuple[str, int], str]:
    """Greedy text for every (adapter, prompt index) from the adapter merged into a fresh copy of the base."""
    import lorakit

    out = {}
    for name, d in adapter_dirs.items():
        m = base
        if d is not None:
            m = copy.deepcopy(base)
            lorakit.load_adapter(m, d, "x")
            lorakit.merge_and_unload(m)
        with torch.no_grad():
            for i, p in enumerate(prompts):
                ids = m.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.pad_token_id or 0)[0, len(p):]
                out[(name, i)] = tok.decode(ids.tolist(), skip_special_tokens=True)
        del m
    return out


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_load_test(engine, refs: dict[tuple[str, int], str], prompts: list[list[int]], names: list[str], *,
                  n_requests: int = 500, concurrency: int = 32, max_tokens: int = 8, churn_every: int = 10,
                  alias: tuple[str, str, str] | None = None, seed: int = 0, timeout_s: float = 600.0) -> dict:
    """Start the HTTP server on loopback, fire ``n_requests`` at ``concurrency``, churn adapters, check outputs.

    ``names``: adapters (sub-directories of the engine's adapter dir) requests pick from at random; every
    ``churn_every`` requests one of them is unloaded and loaded again (an unloaded adapter is not served until it is
    loaded again, so the churn waits until no request for it is in flight and holds new ones back meanwhile).
    ``alias``: (new name, lora_path, name whose reference it shares) registered through ``load_lora_adapter``.
    """
    import httpx
    import uvicorn

    from .server import create_app

    engine.start()
    app = create_app(engine)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    t_start = time.perf_counter()
    while not server.started:
        if time.perf_counter() - t_start > 30:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    rng = random.Random(seed)
    pool = list(names) + ([alias[0]] if alias else [])
    ref_name = {n: n for n in names}
    if alias:
        ref_name[alias[0]] = alias[2]
    jobs = [(rng.choice(pool), rng.randrange(len(prompts))) for _ in range(n_requests)]
    lat: list[float] = []
    errors: list[str] = []
    mismatches: list[tuple] = []
    churn = {"unloads": 0, "loads": 0}
    inflight = {n: 0 for n in pool}

    async def main():
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        locks = {n: asyncio.Lock() for n in pool}
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as c:
            if alias:
                r = await c.post("/v1/load_lora_adapter", json={"lora_name": alias[0], "lora_path": alias[1]})
                r.raise_for_status()
                churn["loads"] += 1

            async def one(k, name, pi):
                async with sem:
                    if churn_every and k and k % churn_every == 0:
                        victim = rng.choice([n for n in names if n != engine.base_name] or [None])
                        if victim is not None:
                            async with locks[victim]:
                                while inflight[victim]:
                                    await asyncio.sleep(0.005)
                                r = await c.post("/v1/unload_lora_adapter", json={"lora_name": victim})
                                churn["unloads"] += r.status_code == 200
                                r = await c.post("/v1/load_lora_adapter", json={"lora_name": victim})
                                churn["loads"] += r.status_code == 200
                                if r.status_code != 200:
                                    errors.append(f"reload {victim}: HTTP {r.status_code}: {r.text[:200]}")
                    async with locks[name]:  # not while a churn of this adapter runs
                        inflight[name] += 1
                    t = time.perf_counter()
                    try:
                        r = await c.post("/v1/completions", json={"model": name, "prompt": prompts[pi],
                                                                  "max_tokens": max_tokens, "temperature": 0,
                                                                  "ignore_eos": True})
                    except httpx.HTTPError as e:
                        errors.append(f"{name}: {type(e).__name__}: {e}")
                        return
                    finally:
                        inflight[name] -= 1
                    lat.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        errors.append(f"{name}: HTTP {r.status_code}: {r.text[:200]}")
                        return
                    text = r.json()["choices"][0]["text"]
                    if text != refs[(ref_name[name], pi)]:
                        mismatches.append((name, pi, text, refs[(ref_name[name], pi)]))

            await asyncio.gather(*(one(k, n, p) for k, (n, p) in enumerate(jobs)))

    try:
        asyncio.run(asyncio.wait_for(main(), timeout_s))
    finally:
        server.should_exit = True
        th.join(timeout=10)
    wall = time.perf_counter() - t_start
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")
    m = engine.metrics()
    return {"requests": n_requests, "concurrency": concurrency, "errors": len(errors), "error_examples": errors[:3],
            "mismatches": len(mismatches), "mismatch_examples": mismatches[:3], "wall_s": round(wall, 2),
            "req_per_s": round(n_requests / wall, 2), "p50_s": round(q(0.5), 4), "p99_s": round(q(0.99), 4),
            "mean_s": round(statistics.fmean(lat), 4) if lat else None, "unloads": churn["unloads"],
            "adapter_loads": m["adapter_loads"], "adapter_evictions": m["adapter_evictions"],
            "adapter_hit_rate": m["adapter_hit_rate"], "generated_tokens": m["generated_tokens"]}
