"""Generation engine: continuous batching over an :class:`AdapterBank`, adapters loaded on demand into an LRU.

One engine thread owns the model. Each iteration it (1) installs adapters whose cold load finished (loaded by a
worker thread, so loading never blocks decoding), (2) decodes one token for every running request (one batched
forward, one adapter id per row), (3) prefills newly admitted requests as one left-padded batch and merges their KV
cache into the running one. Requests join and leave between decode steps.

KV cache: a transformers ``DynamicCache`` kept rectangular (batch, heads, L, dim) with left padding; each row has
its own attention mask and position ids, so rows of different lengths decode together exactly. Rows that finish
are dropped (``batch_select_indices``) and all-padding leading columns are trimmed.
"""
from __future__ import annotations

import itertools
import logging
import math
import numbers
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError, ConfigError, LorakitError
from .bank import AdapterBank, ServedAdapter, install, read_served
from .detok import Detokenizer

log = logging.getLogger(__name__)

__all__ = ["SamplingParams", "Request", "Engine", "EngineError", "AdapterNotFound", "AdapterConflict",
           "valid_adapter_name", "check_limits", "LIMITS", "MIN_TEMPERATURE"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")

MIN_TEMPERATURE = 1e-5  # below this a temperature is served as greedy (as vLLM does): 1/T would overflow the logits
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_PATH_CHARS = 4096
UNLOAD_WAIT_S = 10.0  # unload_adapter waits at most this long for the engine thread to evict an idle adapter

# Engine limits: (smallest, largest) sensible value; anything else is refused when the engine is built.
LIMITS: dict[str, tuple[float, float]] = {
    "max_loras": (1, 4096), "max_batch": (1, 4096), "max_new_tokens": (1, 1 << 20),
    "max_prompt_tokens": (1, 1 << 24), "gather_cache_mb": (0, 1 << 20),
}


class EngineError(LorakitError, ValueError):
    """A request the engine cannot serve (too long, bad parameters, ...)."""


class AdapterNotFound(EngineError):
    """The requested adapter is neither loaded nor in the adapter directory."""


class AdapterConflict(EngineError):
    """A load names an adapter that is registered, loading or resident from another path (HTTP 409)."""


def check_limits(**limits) -> None:
    """Refuse (:class:`ConfigError`) engine limits outside :data:`LIMITS` (zero, negative, absurdly large, NaN)."""
    for k, v in limits.items():
        if v is None and k == "max_prompt_tokens":
            continue
        lo, hi = LIMITS[k]
        integral = k != "gather_cache_mb"
        ok = isinstance(v, numbers.Integral if integral else numbers.Real)
        if not ok or isinstance(v, bool) or not math.isfinite(v) or not (lo <= v <= hi):
            raise ConfigError(f"{k} must be {'an integer' if integral else 'a number'} in [{lo}, {hi}], got {v!r}")


def _show(v: Any, n: int = 80) -> str:
    """A client-given value for an error message: its repr, cut to ``n`` characters."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + f"... ({len(r)} characters)"


def valid_adapter_name(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    top_k: int = 0  # keep the k most likely tokens (0 or -1 = all)

    def check(self, limit: int) -> None:
        def num(v, kind=numbers.Real):
            return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)

        if not num(self.max_tokens, numbers.Integral) or not (1 <= self.max_tokens <= limit):
            raise EngineError(f"max_tokens must be an integer in [1, {limit}], got {self.max_tokens!r}")
        if not num(self.temperature) or not (0.0 <= self.temperature <= 10.0):
            raise EngineError(f"temperature must be in [0, 10], got {self.temperature!r}")
        if not num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not num(self.top_k, numbers.Integral) or self.top_k < -1:
            raise EngineError(f"top_k must be -1, 0 (all tokens) or a positive integer, got {self.top_k!r}")
        lo, hi = SEED_RANGE
        if self.seed is not None and (not num(self.seed, numbers.Integral) or not (lo <= self.seed <= hi)):
            raise EngineError(f"seed must be an integer in [{lo}, {hi}], got {_show(self.seed)}")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s or len(s) > 64 for s in self.stop):
            raise EngineError("stop: at most 8 non-empty strings of at most 64 characters")


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    callback: Callable[["Request", str, Any], None] | None = None  # (req, "delta"|"done", payload)
    id: int = field(default_factory=lambda: next(_ids))
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    detok: Detokenizer | None = None  # the output's incremental detokenizer (settled text = ``text``)
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None  # the HTTP status of an error: 4xx the request or its adapter, 5xx the server
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_done: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    gen: torch.Generator | None = None
    cancelled: bool = False

    def result(self, timeout: float | None = None) -> "Request":
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout}s")
        return self


class Engine:
    """Continuous-batching generation over many adapters on one base model.

    ``adapter_dir``: a directory whose sub-directories are adapters (the name is the sub-directory name);
    ``max_loras``: adapters resident in the bank at once (LRU; adapters used by running requests are pinned).
    ``gather_cache_mb``: memory for keeping the running batch's gathered adapter weights across decode steps.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, adapter_dir: str | Path | None = None, *, max_loras: int = 8,
                 max_batch: int = 64, base_name: str = "base", targets: Any = "all-linear",
                 max_new_tokens: int = 512, max_prompt_tokens: int | None = None, gather_cache_mb: float = 2048):
        check_limits(max_loras=max_loras, max_batch=max_batch, max_new_tokens=max_new_tokens,
                     max_prompt_tokens=max_prompt_tokens, gather_cache_mb=gather_cache_mb)
        self.model = model.eval()
        self.tok = tokenizer
        self.bank: AdapterBank = install(model, targets, gather_cache_mb=gather_cache_mb)
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.max_loras, self.max_batch, self.base_name = max_loras, max_batch, base_name
        self.max_new_tokens = max_new_tokens
        ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.max_context = ctx
        self.max_prompt_tokens = min(max_prompt_tokens or ctx, ctx)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.registry: dict[str, Path] = {}  # explicitly loaded (load_lora_adapter) name -> path
        self.paths: dict[str, Path] = {}  # resident or loading adapter -> the path its weights come from
        self.reserving: dict[str, Path] = {}  # load_lora_adapter calls in progress: name -> path
        self.disabled: set[str] = set()  # unloaded names: not served (not even from the directory) until loaded
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.loading: dict[str, Future] = {}
        self.unload_pending: set[str] = set()
        self.waiting: list[Request] = []
        self.rows: list[Request] = []  # running, in cache row order
        self.cache = None
        self.attn: Tensor | None = None
        self.pos: Tensor | None = None
        self.last: Tensor | None = None
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-load")
        self._pool_closed = False
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.m = {"requests": 0, "requests_failed": 0, "prompt_tokens": 0, "generated_tokens": 0,
                  "adapter_hits": 0, "adapter_misses": 0, "adapter_loads": 0, "adapter_load_errors": 0,
                  "adapter_evictions": 0, "adapter_load_ms_total": 0.0, "decode_steps": 0}
        self.t0 = time.perf_counter()
        self._tok_times: list[tuple[float, int]] = []

    # --- adapters ------------------------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> str | None:
        """Adapter name as requested -> bank name (None = base). Raises AdapterNotFound."""
        if name is None or name == "" or name == self.base_name:
            return None
        if not valid_adapter_name(name):
            raise AdapterNotFound(f"invalid adapter name {_show(name)} (letters, digits, '.', '_', '-', at most 128; "
                                  "no '..')")
        with self.lock:
            if name in self.disabled and name not in self.registry and name not in self.reserving:
                raise AdapterNotFound(f"adapter {name!r} was unloaded; load it again with POST "
                                      "/v1/load_lora_adapter")
            if name in self.registry or name in self.bank or name in self.loading or name in self.reserving:
                return name
        p = self._path_of(name)
        if p is None:
            raise AdapterNotFound(f"adapter {name!r} not found" + ("" if self.adapter_dir else
                                                                  " (no adapter directory configured)"))
        return name

    def _path_of(self, name: str) -> Path | None:
        """Where adapter ``name`` is read from: its registration, else its sub-directory (None: not served)."""
        if name in self.registry:
            return self.registry[name]
        if name in self.disabled:
            return None
        return self._dir_adapter(name)

    def _dir_adapter(self, name: str) -> Path | None:
        """``adapter_dir/name`` resolved, if it is an adapter directory that lies (symlinks followed) inside."""
        if self.adapter_dir is None or not valid_adapter_name(name):
            return None
        try:
            p = (self.adapter_dir / name).resolve()
            if not p.is_relative_to(self.adapter_dir) or not (p / "adapter_config.json").is_file():
                return None
        except (OSError, RuntimeError, ValueError):
            return None
        return p

    def check_path(self, path: str | Path) -> Path:
        """A path for ``load_lora_adapter``: must lie inside the adapter directory (symlinks resolved)."""
        if self.adapter_dir is None:
            raise EngineError("loading adapters by path needs an adapter directory (--adapters DIR)")
        sp = str(path)
        if not sp or len(sp) > MAX_PATH_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in sp):
            raise EngineError(f"lora_path must be a non-empty path of at most {MAX_PATH_CHARS} characters without "
                              "control characters (NUL, newline, ...)")
        try:
            p = Path(sp)
            p = (p if p.is_absolute() else self.adapter_dir / p).resolve()
            inside = p.is_relative_to(self.adapter_dir)
            is_adapter = inside and (p / "adapter_config.json").is_file()
        except (OSError, RuntimeError, ValueError):
            raise EngineError("lora_path cannot be resolved (too long a name, a symlink loop, or an invalid "
                              "path)") from None
        shown = sp if len(sp) <= 200 else sp[:200] + "..."
        if not inside:
            raise EngineError(f"lora_path {shown!r} is outside the adapter directory (symlinks are resolved)")
        if not is_adapter:
            raise AdapterNotFound(f"lora_path {shown!r} is not an adapter directory")
        return p

    def _read(self, path: Path, name: str) -> ServedAdapter:
        """Read an adapter for the bank; every file it reads must resolve inside the adapter directory."""
        return read_served(self.bank, path, name, root=self.adapter_dir)

    def _claim(self, name: str) -> Path | None:
        """The path ``name`` is bound to right now: registered, being registered, resident or loading, or (not
        unloaded) its own sub-directory of the adapter directory."""
        for d in (self.registry, self.reserving, self.paths):
            if name in d:
                return d[name]
        return None if name in self.disabled else self._dir_adapter(name)  # a directory adapter: its directory

    def load_adapter(self, name: str, path: str | Path | None = None, wait: bool = True) -> None:
        """Register ``name`` (at ``path``, inside the adapter dir) and load it now (vLLM ``load_lora_adapter``).

        The name is checked and reserved under the engine lock before the files are read, so of two concurrent
        loads of one name with different paths exactly one succeeds and the other raises :class:`AdapterConflict`;
        a name is always served with the weights of the path it is registered to. Loading a name that is already
        loaded from the same path is a no-op; to read changed files, unload it first. Loading an unloaded
        directory adapter makes it servable again."""
        if not valid_adapter_name(name) or name == self.base_name:
            raise EngineError(f"invalid adapter name {_show(name)} (letters, digits, '.', '_', '-', at most 128; "
                              "no '..'; not the base model's name)")
        p = self.check_path(path if path is not None else name)
        with self.lock:
            cur = self._claim(name)
            if name in self.reserving:
                raise AdapterConflict(f"adapter {name!r} is being loaded by another request" +
                                      ("" if cur == p else " from another path"))
            if cur is not None and cur != p:
                what = ("registered" if name in self.registry else "being unloaded (requests still use it)"
                        if name in self.unload_pending else "loaded" if name in self.paths else
                        "an adapter of the adapter directory")
                raise AdapterConflict(f"adapter {name!r} is already {what} with another path; unload it first")
            if (name in self.registry and name not in self.unload_pending
                    and (name in self.bank or name in self.loading)):
                return  # already loaded from this path
            self.reserving[name] = p
        try:
            sa = self._read(p, name)  # validate now (clear error to the caller); cheap for LoRA
        except BaseException:
            with self.lock:
                self.reserving.pop(name, None)
            raise
        with self.lock:
            self.reserving.pop(name, None)
            self.registry[name] = p
            self.disabled.discard(name)
            self.unload_pending.discard(name)
            if name not in self.bank and name not in self.loading:
                f: Future = Future()
                f.set_result((sa, 0.0))
                self.loading[name] = f
                self.paths[name] = p
            self.wake.notify_all()

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``: it is no longer served, not even from its sub-directory of the adapter directory, until
        it is loaded again (``load_adapter`` / ``POST /v1/load_lora_adapter``). Running requests finish with it."""
        with self.lock:
            if name in self.reserving:
                raise AdapterConflict(f"adapter {name!r} is being loaded right now; unload it afterwards")
            known = (name in self.registry or name in self.bank or name in self.loading
                     or (name not in self.disabled and self._dir_adapter(name) is not None))
            if not known:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            self.registry.pop(name, None)
            self.disabled.add(name)
            self.unload_pending.add(name)
            self.wake.notify_all()
        if self.thread is None:
            self._apply_unloads()
            return
        # the engine thread evicts between steps: wait for it (a few ms), so that when this returns an adapter no
        # request is using is gone and its name can be loaded again from another path at once; one that running
        # requests still use stays "being unloaded" until they finish
        deadline = time.monotonic() + UNLOAD_WAIT_S
        with self.lock:
            while (name in self.unload_pending and self.thread is not None and self.thread.is_alive()
                   and not any(r.adapter == name for r in self.rows)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wake.wait(timeout=min(left, 0.05))

    def models(self) -> list[str]:
        with self.lock:
            names = set(self.registry) | set(self.bank.slots)
            disabled = set(self.disabled) - set(self.registry)
        if self.adapter_dir is not None:
            try:
                entries = [p.name for p in self.adapter_dir.iterdir()]
            except OSError:
                entries = []
            names |= {n for n in entries if n not in disabled and self._dir_adapter(n) is not None}
        return sorted(names - disabled)

    # --- requests --------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            try:
                return list(self.tok(prompt, add_special_tokens=True)["input_ids"])
            except Exception:  # lone surrogates and other text the tokenizer cannot take
                raise EngineError("the prompt cannot be tokenized (invalid unicode, e.g. a lone surrogate?)") from None
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise EngineError("prompt token ids must be integers")
        return [int(t) for t in prompt]

    def submit(self, prompt: str | list[int], adapter: str | None = None, params: SamplingParams | None = None,
               callback=None) -> Request:
        params = params or SamplingParams()
        params.check(self.max_new_tokens)
        ids = self.encode(prompt)
        if not ids:
            raise EngineError("empty prompt")
        if len(ids) > self.max_prompt_tokens or len(ids) + params.max_tokens > self.max_context:
            raise EngineError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the limit "
                              f"(prompt <= {self.max_prompt_tokens}, total <= {self.max_context})")
        if any(t < 0 or t >= self.model.config.vocab_size for t in ids):
            raise EngineError("prompt token id out of the vocabulary")
        name = self.resolve(adapter)
        req = Request(ids, name, params, callback)
        if params.temperature >= MIN_TEMPERATURE:
            req.gen = torch.Generator().manual_seed(int(params.seed) if params.seed is not None
                                                    else int(torch.randint(0, 2**62, ()).item()))
        with self.lock:
            self.waiting.append(req)
            self.m["requests"] += 1
            self.m["prompt_tokens"] += len(ids)
            self.wake.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client went away); it leaves the batch at the next step."""
        req.cancelled = True
        with self.lock:
            if req in self.waiting:
                self.waiting.remove(req)
                self._finish(req, "abort")

    def generate(self, prompts: list, adapters: list | None = None, params: SamplingParams | list | None = None
                 ) -> list[Request]:
        """Submit several requests and wait (drives the loop itself when no engine thread runs)."""
        adapters = adapters or [None] * len(prompts)
        ps = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.submit(p, a, q) for p, a, q in zip(prompts, adapters, ps)]
        if self.thread is None:
            while not all(r.done.is_set() for r in reqs):
                if not self.step():
                    time.sleep(0.001)
        for r in reqs:
            r.result()
        return reqs

    # --- loop ------------------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self.thread is None:
            self.stopping = False
            if self._pool_closed:  # restarted after stop()
                self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-load")
                self._pool_closed = False
            self.thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (waiting at most ``timeout`` s for its current step) and end every request
        still waiting or running with an error, so no caller waits forever."""
        with self.lock:
            self.stopping = True
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=timeout)
            if self.thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s; abandoning it", timeout)
            self.thread = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._pool_closed = True
        with self.lock:
            left = self.waiting + self.rows
            self.waiting, self.rows = [], []
            self.cache = self.attn = self.pos = self.last = None
        for r in left:
            self._finish(r, "abort", "the server is shutting down", 503)

    def _run(self) -> None:
        while not self.stopping:
            try:
                busy = self.step()
            except Exception:  # never let the loop die: fail the running batch, keep serving
                log.exception("engine step failed")
                self._fail_all("internal error in the generation step (the server log has the details); the "
                               "request was stopped")
                busy = False
            if not busy:
                with self.lock:
                    if not self.stopping and not self.waiting and not self.rows:
                        self.wake.wait(timeout=0.05)
                    elif not self.rows:
                        self.wake.wait(timeout=0.002)

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration; returns whether any model work was done."""
        self._apply_unloads()
        self._install_loaded()
        worked = False
        if self.rows:
            self._decode()
            worked = True
        new = self._admit()
        if new:
            try:
                self._prefill(new)
            except Exception:  # the admitted requests are in neither list yet: end them here, alone
                log.exception("prefill failed")
                if any(r in self.rows for r in new):
                    raise  # failed after joining the batch: the loop fails the batch (its state is unknown)
                for r in new:
                    self._finish(r, "error", "internal error while reading the prompt (the server log has the "
                                 "details); the request was stopped", 500)
            worked = True
        return worked

    # --- adapter residency ---------------------------------------------------------------------------------------
    def _in_use(self) -> set[str]:
        return {r.adapter for r in self.rows if r.adapter} | {r.adapter for r in self.waiting if r.adapter}

    def _apply_unloads(self) -> None:
        with self.lock:
            pending = list(self.unload_pending)
            busy = {r.adapter for r in self.rows if r.adapter}
        for n in pending:
            if n in busy:
                continue  # running requests finish with it; evicted afterwards
            with self.lock:
                self.unload_pending.discard(n)
                f = self.loading.pop(n, None)
                if f is not None:
                    f.cancel()
                if n in self.bank:
                    self.bank.remove(n)
                self.lru.pop(n, None)
                self.paths.pop(n, None)
                self.wake.notify_all()  # an unload_adapter call may be waiting for this

    def _start_load(self, name: str, path: Path) -> None:
        def job():
            t = time.perf_counter()
            sa = self._read(path, name)
            return sa, (time.perf_counter() - t) * 1000

        self.m["adapter_misses"] += 1
        self.paths[name] = path
        self.loading[name] = self.pool.submit(job)

    def _fail_waiting(self, name: str, msg: str, status: int) -> None:
        with self.lock:
            for r in [r for r in self.waiting if r.adapter == name]:
                self.waiting.remove(r)
                self._finish(r, "error", msg, status)

    def _install_loaded(self) -> None:
        with self.lock:
            done = [(n, f) for n, f in self.loading.items() if f.done()]
        for n, f in done:
            try:
                sa, ms = f.result()
            except BaseException as e:  # a bad adapter fails only its own requests (also a cancelled load)
                with self.lock:
                    self.loading.pop(n, None)
                    self.paths.pop(n, None)
                    self.m["adapter_load_errors"] += 1
                msg = str(e) if isinstance(e, LorakitError) else "its files could not be read (see the server log)"
                self._fail_waiting(n, f"cannot load adapter {n!r}: {msg}", 400)
                log.warning("adapter %r failed to load: %s", n, msg)
                continue
            if not self._make_room():
                continue  # all resident adapters are busy; retry next step
            with self.lock:
                self.loading.pop(n, None)
                if n in self.unload_pending:
                    self.paths.pop(n, None)
                    continue
                try:
                    self.bank.add(sa)
                except Exception:  # (out of memory, ...): fail this adapter's requests, keep serving the others
                    log.exception("adapter %r could not be added to the bank", n)
                    self.paths.pop(n, None)
                    self._fail_waiting(n, f"cannot load adapter {n!r}: the server could not make room for it "
                                       "(see the server log)", 503)
                    continue
                self.lru[n] = None
                self.m["adapter_loads"] += 1
                self.m["adapter_load_ms_total"] += ms
                self.m["last_adapter_load_ms"] = round(ms, 3)

    def _make_room(self) -> bool:
        while len(self.bank) >= self.max_loras:
            busy = {r.adapter for r in self.rows if r.adapter}
            victim = next((n for n in self.lru if n not in busy), None)
            if victim is None:
                return False
            self.bank.remove(victim)
            self.lru.pop(victim)
            self.paths.pop(victim, None)
            self.m["adapter_evictions"] += 1
        return True

    def _admit(self) -> list[Request]:
        out: list[Request] = []
        with self.lock:
            room = self.max_batch - len(self.rows)
            for r in list(self.waiting):
                if room <= 0:
                    break
                n = r.adapter
                if n is not None and n in self.unload_pending:
                    continue  # removed at the next step; then this request is refused below
                if n is not None and n not in self.bank:
                    if n in self.reserving:
                        continue  # a load_lora_adapter call is reading it; wait for its registration
                    if n not in self.loading:
                        path = self._path_of(n)
                        if path is None:
                            self.waiting.remove(r)
                            self._finish(r, "error", f"adapter {n!r} is not available (it was unloaded, or its "
                                         "load failed)", 404)
                            continue
                        self._start_load(n, path)
                    continue
                if n is not None:
                    self.lru[n] = None  # adapters added to the bank directly are tracked from their first use
                    self.lru.move_to_end(n)
                    self.m["adapter_hits"] += 1
                self.waiting.remove(r)
                out.append(r)
                room -= 1
        return out

    # --- model work ------------------------------------------------------------------------------------------------
    def _slots(self, reqs: list[Request]) -> Tensor:
        return torch.tensor([self.bank.slot(r.adapter) for r in reqs], dtype=torch.long)

    def _prefill(self, reqs: list[Request]) -> None:
        from transformers import DynamicCache

        P = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(reqs), P, dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            ids[i, P - n:] = torch.tensor(r.prompt_ids)
            mask[i, P - n:] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache()
        self.bank.set_ids(self._slots(reqs))
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True).logits[:, -1]
        finally:
            self.bank.set_ids(None)
        nxt, failed = self._sample(reqs, logits)
        self._merge_cache(reqs, cache, mask, mask.sum(1), nxt)
        self._emit(nxt, len(self.rows) - len(reqs), failed)

    def _decode(self) -> None:
        mask = torch.cat([self.attn, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        self.bank.set_ids(self._slots(self.rows))
        try:
            logits = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.pos[:, None],
                                past_key_values=self.cache, use_cache=True).logits[:, -1]
        finally:
            self.bank.set_ids(None)
        self.attn = mask
        self.pos = self.pos + 1
        self.m["decode_steps"] += 1
        nxt, failed = self._sample(self.rows, logits)
        self.last = nxt
        self._emit(nxt, 0, failed)

    def _sample(self, reqs: list[Request], logits: Tensor) -> tuple[Tensor, dict[int, str]]:
        """Next token per row, and ``{row: why}`` for rows that cannot go on (their requests fail, alone).

        Sampling never sees non-finite probabilities: the logits are shifted so their maximum is 0 before the
        temperature divides them (``(l - max)/T <= 0``, the argmax stays at exactly 0, so the softmax's sum is at
        least 1), temperatures below :data:`MIN_TEMPERATURE` are greedy, and top-k/top-p always keep the most likely
        token. A row whose logits are NaN or +inf (an overflow in the model or its adapter) fails by itself."""
        logits = logits.float()
        nxt = logits.argmax(-1)
        bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
        failed = {int(i): "the model produced non-finite logits for this request (a numerical overflow in the base "
                  "model or its adapter)" for i in bad.nonzero().flatten().tolist()}
        for i, r in enumerate(reqs):
            p = r.params
            if i in failed or p.temperature < MIN_TEMPERATURE:
                continue
            try:
                z = (logits[i] - logits[i].max()) / p.temperature
                if 0 < p.top_k < z.shape[-1]:
                    kth = torch.topk(z, p.top_k).values[-1]
                    z = z.masked_fill(z < kth, float("-inf"))
                probs = torch.softmax(z, -1)
                if p.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    keep = sp.cumsum(0) - sp < p.top_p  # smallest set whose mass reaches top_p (>= 1 token)
                    probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
                    log.warning("request %s: sampling probabilities not finite; using the greedy token", r.id)
                    continue
                nxt[i] = torch.multinomial(probs, 1, generator=r.gen)[0]
            except Exception:  # one request's sampling must never fail the batch
                log.exception("request %s: sampling failed", r.id)
                failed[i] = "sampling failed for this request (the server log has the details)"
        return nxt, failed

    def _merge_cache(self, reqs, cache, mask, lengths, nxt) -> None:
        if not self.rows:
            self.rows, self.cache, self.attn, self.pos, self.last = list(reqs), cache, mask, lengths.clone(), nxt
            return
        L, P = self.attn.shape[1], mask.shape[1]
        T = max(L, P)

        def padl(t: Tensor, n: int) -> Tensor:
            if n == 0:
                return t
            z = torch.zeros(*t.shape[:-2], n, t.shape[-1], dtype=t.dtype, device=t.device)
            return torch.cat([z, t], -2)

        for a, b in zip(self.cache.layers, cache.layers):
            a.keys = torch.cat([padl(a.keys, T - L), padl(b.keys, T - P)], 0)
            a.values = torch.cat([padl(a.values, T - L), padl(b.values, T - P)], 0)
        z = lambda m, n: torch.cat([torch.zeros(m.shape[0], n, dtype=m.dtype), m], 1)
        self.attn = torch.cat([z(self.attn, T - L), z(mask, T - P)], 0)
        self.pos = torch.cat([self.pos, lengths])
        self.last = torch.cat([self.last, nxt])
        self.rows += list(reqs)

    def _emit(self, nxt: Tensor, start: int = 0, failed: dict[int, str] | None = None) -> None:
        """Hand out the sampled tokens of rows ``start:`` (the newly prefilled rows, or all after a decode);
        ``failed`` (indices relative to ``start``) end with their error."""
        now = time.perf_counter()
        done_idx = []
        toks = nxt.tolist()
        failed = failed or {}
        for i, r in enumerate(self.rows[start:], start):
            t = toks[i - start]
            if r.t_first is None:
                r.t_first = now
            finish = None
            if r.cancelled or (i - start) in failed:
                done_idx.append(i)
                if r.cancelled:
                    self._finish(r, "abort")
                else:
                    self._finish(r, "error", failed[i - start], 500)
                continue
            if r.detok is None:
                r.detok = Detokenizer(self.tok)
            if t in self.eos and not r.params.ignore_eos:
                finish = "stop"
                r.text = r.detok.final()
            else:
                r.out_ids.append(t)
                self.m["generated_tokens"] += 1
                r.detok.add(t)  # incremental: O(1) tokenizer work per token, not a decode of the whole output
                last = len(r.out_ids) >= r.params.max_tokens
                prev = len(r.text)  # the text only grows: search for stop strings in the new tail only
                r.text = r.detok.final() if last else r.detok.text
                if r.params.stop and len(r.text) > prev:
                    hits = [i for i in (r.text.find(s, max(0, prev - len(s) + 1)) for s in r.params.stop) if i >= 0]
                    if hits:
                        r.text = r.text[:min(hits)]
                        finish = "stop"
                if finish is None and last:
                    finish = "length"
            if finish is None:
                hold = max((len(s) for s in r.params.stop), default=1) - 1
                upto = len(r.text) - hold
                if r.text.endswith("\ufffd"):
                    upto = min(upto, len(r.text) - 1)
                if upto > r.sent:
                    self._cb(r, "delta", r.text[r.sent:upto])
                    r.sent = upto
            else:
                done_idx.append(i)
                if len(r.text) > r.sent:
                    self._cb(r, "delta", r.text[r.sent:])
                    r.sent = len(r.text)
                self._finish(r, finish)
        self._tok_times.append((now, len(toks)))
        if done_idx:
            self._drop(done_idx)

    def _drop(self, idx: list[int]) -> None:
        drop = set(idx)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        if not keep:
            self.rows, self.cache, self.attn, self.pos, self.last = [], None, None, None, None
            return
        kt = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.attn, self.pos, self.last = self.attn[kt], self.pos[kt], self.last[kt]
        used = self.attn.any(0).nonzero()
        first = int(used[0]) if used.numel() else 0
        for lay in self.cache.layers:
            lay.keys = lay.keys[kt, :, first:]
            lay.values = lay.values[kt, :, first:]
        self.attn = self.attn[:, first:]

    def _cb(self, r: Request, kind: str, payload: Any) -> None:
        if r.callback is not None:
            try:
                r.callback(r, kind, payload)
            except Exception:  # a client that went away must not hurt the others
                log.debug("callback failed for request %s", r.id, exc_info=True)

    def _finish(self, r: Request, reason: str, error: str | None = None, status: int | None = None) -> None:
        if r.done.is_set():
            return  # a request ends once
        r.finish_reason, r.error, r.t_done = reason, error, time.perf_counter()
        if error:
            r.status = status or 500
            self.m["requests_failed"] += 1
        self._cb(r, "done", None)
        r.done.set()

    def _fail_all(self, msg: str) -> None:
        with self.lock:
            for r in self.rows:
                self._finish(r, "error", msg, 500)
            self.rows, self.cache, self.attn, self.pos, self.last = [], None, None, None, None

    # --- metrics ---------------------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        now = time.perf_counter()
        self._tok_times = [(t, n) for t, n in self._tok_times if now - t < 10.0]
        recent = sum(n for _, n in self._tok_times)
        span = (now - self._tok_times[0][0]) if len(self._tok_times) > 1 else 0.0
        with self.lock:
            out = dict(self.m)
            out.update(running=len(self.rows), waiting=len(self.waiting), resident_adapters=sorted(self.bank.slots),
                       loading_adapters=sorted(self.loading), max_loras=self.max_loras,
                       tokens_per_s=round(recent / span, 2) if span > 0 else 0.0,
                       uptime_s=round(now - self.t0, 1))
        loads = max(out["adapter_loads"], 1)
        out["adapter_load_ms_avg"] = round(out.pop("adapter_load_ms_total") / loads, 3)
        hm = out["adapter_hits"] + out["adapter_misses"]
        out["adapter_hit_rate"] = round(out["adapter_hits"] / hm, 4) if hm else None
        return out
