"""SFT: loss on the completion (or, for chats, the assistant turns) only; eval = completion loss (+ GSM8K exact
match). Rows are prompt/completion pairs (``data.format=prompt``) or chats (``data.format=messages``: a
``messages`` list of ``{role, content}`` rendered by the tokenizer's chat template). ``data.packing`` packs a
batch's samples into rows of up to ``max_length`` tokens with per-sample position ids, so no token attends across
samples (see :func:`pack`)."""
from __future__ import annotations

import json
import logging
import re

import torch
import torch.nn.functional as F

from .. import assets
from ..errors import ConfigError
from .base import Task, pad, to_device
from .logits import fast_head, labelled_logprobs

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")

_NUM = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style text: the number after ``####``, else the last number; commas removed."""
    tail = text.split("####", 1)[1] if "####" in text else text
    nums = _NUM.findall(tail)
    if not nums:
        return None
    n = (nums[0] if "####" in text else nums[-1]).replace(",", "").rstrip(".")
    try:
        f = float(n)
        return str(int(f)) if f == int(f) else str(f)
    except ValueError:
        return n


def greedy_answers(model, tok, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                   batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, ``batch_size`` at a time: left-padded with the attention mask
    covering the padding (so every row's positions and tokens are those of its own unpadded run), finished rows
    filled with ``pad_id``. On 2 CPU cores a decode step of 8 SmolLM2 rows costs about twice one row's (160 vs
    87 ms), so the GSM8K exact match of ``gen_samples`` answers takes the time of a few."""
    device = next(model.parameters()).device
    texts = []
    for i in range(0, len(prompts), max(batch_size, 1)):
        chunk = prompts[i:i + max(batch_size, 1)]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id)
        texts += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
    return texts


def check_messages(messages, where: str) -> list[dict]:
    """A chat: a non-empty list of ``{role, content}`` (content a string) with at least one assistant turn, none
    first. A JSON string (a CSV cell) is parsed. ConfigError naming ``where`` otherwise."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: 'messages' is not a JSON list ({e})") from None
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i + 1} must be an object with string 'role' and 'content', got "
                              f"{m!r}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: message {i + 1} has role {m['role']!r}; roles: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ConfigError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    if out[0]["role"] == "assistant":
        raise ConfigError(f"{where}: the conversation starts with an assistant turn; it must follow a system or "
                          "user message")
    return out


def _render(tok, messages, gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the chat rendered by the tokenizer's template, and the character span of each assistant
    turn: from the end of the conversation before it rendered with the generation prompt (``<|im_start|>assistant\n``
    in ChatML) to the end of the conversation up to and including it (its content, end-of-turn token and whatever
    the template writes after it). Needs a template that renders a conversation's prefix as a prefix of the text."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError("data.format=messages needs a tokenizer with a chat template; this one has none (use an "
                          "instruct/chat model, or data.format=prompt)")
    text = _render(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = _render(tok, messages[:i], True), _render(tok, messages[:i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ConfigError("the tokenizer's chat template does not render a conversation's beginning as the "
                              "beginning of the whole (it rewrites earlier turns), so the assistant turns cannot be "
                              "located; use data.format=prompt")
        spans.append((len(before), len(upto)))
    return text, spans


def chat_example(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a chat: the template's rendering tokenized (no extra special tokens: the template
    writes them), labels = the token ids inside assistant spans (a token counts when it starts in one), -100 else."""
    text, spans = assistant_spans(tok, messages)
    if not getattr(tok, "is_fast", False):
        raise ConfigError("data.format=messages needs a fast (Rust) tokenizer: it maps tokens to characters")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def pack(examples: list[dict], max_length: int, pad_id: int) -> dict:
    """Pack tokenized samples (``input_ids``/``labels``, each at most ``max_length``) greedily in order into rows of
    at most ``max_length`` tokens. Position ids restart at 0 for every sample (and for the padding at a row's end),
    which is what tells the attention where samples begin: transformers' causal mask is block-diagonal over
    position-id runs when no ``attention_mask`` is passed, and FlashAttention reads the runs directly. Each
    sample's first label is -100 so no token is predicted from the previous sample."""
    rows: list[list[dict]] = []
    n = 0
    for e in examples:
        k = len(e["input_ids"])
        if not rows or n + k > max_length:
            rows.append([])
            n = 0
        rows[-1].append(e)
        n += k
    width = max(sum(len(e["input_ids"]) for e in r) for r in rows)
    ids, pos, labs = [], [], []
    for r in rows:
        i, p, lab = [], [], []
        for e in r:
            i += e["input_ids"]
            p += list(range(len(e["input_ids"])))
            lab += [-100] + list(e["labels"][1:])
        k = width - len(i)
        ids.append(i + [pad_id] * k)
        pos.append(p + list(range(k)))
        labs.append(lab + [-100] * k)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labs),
            "use_cache": False}


class SFT(Task):
    prompt_fields = ("prompt",)
    columns = ("prompt", "completion")
    is_classification = False

    def __init__(self, spec, data_cfg=None):
        super().__init__(spec, data_cfg)
        self.chat = getattr(self.cfg, "format", "prompt") == "messages"
        if self.chat:
            self.columns = self.raw_columns = ("messages",)  # kept as read (a list), not turned into a string
        self._packing_checked = False

    def rows(self):
        if not self.chat:
            return super().rows()
        c = self.cfg
        if c.path:
            out = super().rows()
        else:  # a named prompt/completion dataset, each row as a one-turn chat
            self.columns = ("prompt", "completion")
            try:
                out = super().rows()
            finally:
                self.columns = ("messages",)
            out = {k: [{"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["completion"]}]} for r in v]
                   for k, v in out.items()}
        return {k: [{"messages": check_messages(r["messages"], f"{k} row {i + 1}")} for i, r in enumerate(v)]
                for k, v in out.items()}

    def load_model(self, name, dtype="float32", cache=True):
        return assets.load_causal_lm(name, dtype, cache)

    def _encode_chat(self, rows, tok):
        L = self.cfg.max_length
        out, dropped = [], 0
        for r in rows:
            msgs = r["messages"]
            ids, labels = chat_example(tok, msgs)
            ids, labels = ids[:L], labels[:L]
            if all(t == -100 for t in labels[1:]):
                dropped += 1
                continue
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = tok(_render(tok, msgs[:last], True), add_special_tokens=False)["input_ids"][-L:]
            out.append({"prompt": prompt, "input_ids": ids, "labels": labels, "completion": msgs[last]["content"]})
        if dropped:
            log.warning("%d of %d chats have no assistant token within data.max_length=%d and are left out",
                        dropped, len(rows), L)
        if not out:
            raise ConfigError(f"no chat has an assistant token within data.max_length={L}; raise data.max_length")
        return out

    def encode(self, rows, tok):
        self.tok = tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if self.chat:
            return self._encode_chat(rows, tok)
        template = self.prompt_template()
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        L = self.cfg.max_length
        out = []
        for r in rows:
            p = tok(template.format(prompt=r["prompt"]))["input_ids"]
            c = tok(" " + r["completion"].strip(), add_special_tokens=False)["input_ids"] + eos
            if len(p) > L // 2 and len(p) + len(c) > L:
                p = p[-(L // 2):]
            c = c[:max(L - len(p), 1)]
            out.append({"prompt": p, "input_ids": p + c, "labels": [-100] * len(p) + c,
                        "completion": r["completion"]})
        return out

    def collate(self, examples):
        """A training batch: packed (``data.packing``) or padded."""
        if getattr(self.cfg, "packing", False):
            self._probe = examples[0]["input_ids"][:16]
            return pack(examples, self.cfg.max_length, self.pad_id)
        return self.padded(examples)

    def padded(self, examples):
        return {"input_ids": pad([e["input_ids"] for e in examples], self.pad_id),
                "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
                "labels": pad([e["labels"] for e in examples], -100)}

    def forward(self, model, batch):
        if "position_ids" in batch and not self._packing_checked:
            check_packing(model, self._probe)
            self._packing_checked = True
        head = fast_head(model)
        if head is None:
            return super().forward(model, batch)
        lp, _, out = labelled_logprobs(model, head, batch)  # completion tokens only, chunked
        return -lp.mean(), out

    @torch.no_grad()
    def evaluate(self, model, tok, examples, batch_size=16):
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        out: dict[str, float] = {}
        head = fast_head(model)
        try:
            for i in range(0, len(examples), batch_size):
                b = to_device(self.padded(examples[i:i + batch_size]), device)
                if head is not None:  # completion tokens only, chunked
                    lp, _, _ = labelled_logprobs(model, head, b)
                    nll -= float(lp.sum())
                    count += lp.numel()
                    continue
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                tgt = b["labels"][:, 1:]
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum"))
                count += int((tgt != -100).sum())
            out["loss"] = nll / max(count, 1)
            n = min(self.cfg.gen_samples, len(examples))
            if self.spec.gsm8k and n > 0:
                texts = greedy_answers(model, tok, [e["prompt"] for e in examples[:n]], self.cfg.max_new_tokens,
                                       self.pad_id, batch_size)
                hits = sum(final_number(t) is not None and final_number(t) == final_number(e["completion"])
                           for t, e in zip(texts, examples))
                out["exact_match"] = hits / n
                out["exact_match_n"] = float(n)
        finally:
            model.train(was)
        return out


@torch.no_grad()
def check_packing(model, ids: list[int]) -> None:
    """Refuse packing where the model would attend across samples: a sample packed after a copy of itself must give
    the logits it gives alone (checked once, on the first packed batch, in eval mode without autocast)."""
    if len(ids) < 2:
        return
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            one = torch.tensor([ids], device=device)
            alone = model(input_ids=one, use_cache=False).logits.float()
            n = len(ids)
            packed = model(input_ids=torch.cat([one, one], 1), use_cache=False,
                           position_ids=torch.tensor([list(range(n)) * 2], device=device)).logits[:, n:].float()
    finally:
        model.train(was)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    err = float((packed - alone).abs().max()) / (1.0 + float(alone.abs().max()))
    if err > tol:
        raise ConfigError(f"data.packing=true: {type(model).__name__} attends across packed samples (a sample packed "
                          f"after another gives different logits, relative error {err:.2g}); it does not build its "
                          "attention mask from position ids. Set data.packing=false")
