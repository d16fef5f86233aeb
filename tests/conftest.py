"""Tiny models built in code (no downloads) for the contract suite, and shared helpers."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class MLP(nn.Module):
    def __init__(self, d_in=12, d_h=16, d_out=10):
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_h)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(d_h, d_h)
        self.out = nn.Linear(d_h, d_out)

    def forward(self, x):
        return self.out(self.act(self.lin1(self.act(self.lin0(x)))))


class EmbNet(nn.Module):
    def __init__(self, vocab=30, dim=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, 6)

    def forward(self, ids):
        return self.lin(self.emb(ids))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.conv1(torch.relu(self.conv0(x))).mean((2, 3)))


def tiny_llama(seed=0, vocab=64, hidden=32, layers=2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    m = LlamaForCausalLM(cfg).eval()
    # give the (normally zero-init) biases-free model non-trivial norms
    return m


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_gemma(seed=0, tie_word_embeddings=False, vocab=64, hidden=32):
    """A tiny Gemma: its ``embed_tokens`` is a scaled embedding class (output = table[ids] · √hidden, the scale an
    ``embed_scale`` buffer), and with ``tie_word_embeddings`` its output head shares the table."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=tie_word_embeddings)
    return GemmaForCausalLM(cfg).eval()


# kind -> (factory, input factory, targets, layer kinds the case needs)
def _ids(batch=2, seq=7, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


CASES = {
    "mlp": (lambda: MLP(), lambda: torch.randn(4, 12, generator=torch.Generator().manual_seed(1)),
            ["lin0", "lin1"], "linear"),
    "llama": (lambda: tiny_llama(), lambda: _ids(), "all-linear", "linear"),
    "gpt2": (lambda: tiny_gpt2(), lambda: _ids(), ["c_attn", "c_fc"], "conv1d"),
    "embedding": (lambda: EmbNet(), lambda: _ids(vocab=30), ["emb"], "embedding"),
    "conv2d": (lambda: ConvNet(), lambda: torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1)),
               ["conv0", "conv1"], "conv2d"),
    # input embedding and output head share one weight Parameter (SmolLM2, the default model, is built this way)
    "tied": (lambda: tiny_llama(tie_word_embeddings=True), lambda: _ids(), ["embed_tokens"], "embedding"),
    # an embedding class that multiplies its output by a constant (transformers' *ScaledWordEmbedding)
    "scaled": (lambda: tiny_gemma(), lambda: _ids(), ["embed_tokens"], "embedding"),
}


def run(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def tmp_adapter(tmp_path):
    return tmp_path / "adapter"
