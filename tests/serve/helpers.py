"""Shared helpers for the serving tests: tiny Llama + tokenizer saved to disk, adapters with non-trivial weights."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

import lorakit
from conftest import tiny_llama

VOCAB = 300  # 256 byte tokens + specials + spare


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    from tokenizers.pre_tokenizers import ByteLevel

    for i, ch in enumerate(sorted(ByteLevel.alphabet())):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_base(directory: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    m = tiny_llama(seed=seed, vocab=VOCAB, hidden=hidden, layers=layers, bos_token_id=0, eos_token_id=1,
                   pad_token_id=2)
    with torch.no_grad():  # a sharper LM head: larger logit margins make greedy comparisons robust
        m.lm_head.weight.mul_(4)
    m.config.max_position_embeddings = 256
    m.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return Path(directory)


def load_base(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_adapter(base, out: Path, method: str = "lora", r: int = 4, seed: int = 0, targets="all-linear",
                 scale: float = 0.3, **opts) -> Path:
    """Attach ``method`` to a copy of ``base``, randomise its factors (seeded), save to ``out``."""
    m = copy.deepcopy(base)
    lorakit.attach(m, {"method": method, "targets": targets, "r": r, **opts}, "a")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(m, "a"):
            for n, p in a.named_parameters():
                if n.startswith("lora_B") or n.startswith("lora_A"):
                    p.add_(torch.randn(p.shape, generator=g) * scale)
                elif "magnitude" in n:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    lorakit.save_adapter(m, out, "a")
    return Path(out)


def merged_model(base, adapter_dir: Path):
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, adapter_dir, "x")
    return lorakit.merge_and_unload(m)


# --- a real server over loopback ---------------------------------------------------------------------------------
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class http_server:
    """Run ``app`` with uvicorn in a thread on 127.0.0.1 (a port the OS picks); ``with http_server(app) as url``."""

    def __init__(self, app, start_timeout: float = 60.0):
        self.app, self.start_timeout = app, start_timeout

    def __enter__(self) -> str:
        import socket
        import threading
        import time

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                   timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > self.start_timeout or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return f"http://{LOOPBACK}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
