"""Trans-LoRA (lorakit.workflows.transfer) on tiny Llamas with SmolLM2's tokenizer: the discriminator filter, the
teacher's labels, the student trained on synthetic rows only, and the derived target base."""
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import assets
from lorakit.errors import ConfigError
from lorakit.tasks import get_task
from lorakit.tasks.head import head_logits
from lorakit.train.config import DataSection
from lorakit.workflows import transfer as tr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(assets.model_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def teacher_dir(tiny_dir, tmp_path_factory):
    """A source adapter with non-zero factors (its labels must differ from the bare base's to mean anything)."""
    model, _ = assets.load_causal_lm(tiny_dir)
    lorakit.attach(model, {"method": "lora", "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    d = tmp_path_factory.mktemp("teacher") / "adapter"
    lorakit.save_adapter(model, d)
    return str(d)


TEXTS = ["a gripping and heartfelt film", "dull , lifeless and far too long", "the cast is wonderful",
         "i wanted my money back", "an instant classic of the genre", "boring from start to finish"]


def test_teacher_labels_are_the_argmax_of_the_source_adapters_label_word_scores(tiny_dir, teacher_dir):
    task = get_task("sentiment-smollm2", DataSection(task="sentiment-smollm2", eval_size=4, max_length=64))
    task.rows()
    model, tok = task.load_model(tiny_dir)
    lorakit.load_adapter(model, teacher_dir)
    got = tr.teacher_labels(task, model, tok, TEXTS)
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in (" negative", " positive")]
    assert all(len(w) == 1 for w in words)
    want = []
    with torch.no_grad():
        for t in TEXTS:  # the formula, written here: the label word most likely after the prompt
            ids = tok(f"Review: {t}\nSentiment (positive or negative):")["input_ids"]
            lp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            want.append(["negative", "positive"][int(lp[words[1][0]] > lp[words[0][0]])])
    assert got == want
    with lorakit.disabled(model):  # the adapter decides: the bare base labels the same texts differently
        assert tr.teacher_labels(task, model, tok, TEXTS) != got


def test_the_filter_keeps_exactly_the_samples_the_discriminator_scores_as_real(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                            for t, lab in zip(TEXTS, ["real", "synthetic"] * 3)))
    dtask = get_task("classify-head", DataSection(task="classify-head", path=str(data), labels=["real", "synthetic"]))
    dtask.rows()
    torch.manual_seed(3)
    disc, tok = dtask.load_model(tiny_dir)
    torch.nn.init.normal_(disc.score.weight, std=2.0)
    p = tr.discriminate(dtask, disc, tok, TEXTS)
    with torch.no_grad():  # p(real) written here: softmax of the head on the last token, one text at a time
        ref = []
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            ref.append(float(head_logits(disc, ids, torch.ones_like(ids), "last").softmax(-1)[0, 0]))
    assert p == pytest.approx(ref, abs=1e-5)
    thr = sorted(ref)[len(ref) // 2]
    kept = tr.keep_real(TEXTS, p, thr)
    assert kept == [t for t, q in zip(TEXTS, ref) if q >= thr] and 0 < len(kept) < len(TEXTS)


def test_derive_model_drops_layers_and_keeps_the_rest(tiny_dir, tmp_path):
    out = tr.derive_model(tiny_dir, [1], tmp_path / "t")
    a, _ = assets.load_causal_lm(tiny_dir)
    b, _ = assets.load_causal_lm(str(out))
    assert b.config.num_hidden_layers == 2 and len(b.model.layers) == 2
    torch.testing.assert_close(b.model.layers[1].mlp.down_proj.weight, a.model.layers[2].mlp.down_proj.weight)
    assert [m.self_attn.layer_idx for m in b.model.layers] == [0, 1]
    ids = torch.tensor([[5, 6, 7]])
    b.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # the renumbered KV cache works
    with pytest.raises(ConfigError, match="layers"):
        tr.derive_model(tiny_dir, [7], tmp_path / "u")


def test_pipeline_student_trains_on_teacher_labelled_synthetic_rows_only(tiny_dir, teacher_dir, tmp_path):
    small = {"adapter": {"method": "lora", "targets": "all-attention", "r": 2, "alpha": 4, "seed": 0},
             "optim": {"lr": 1e-3}, "train": {"steps": 2}, "data": {"batch_size": 4, "max_length": 32}}
    cfg = {"task": "sentiment-smollm2", "source_model": tiny_dir, "source_adapter": teacher_dir,
           "target_model": tiny_dir, "target_drop_layers": [0], "target_dir": str(tmp_path / "target"),
           "generator": "source", "seeds": 4, "shots": 2,
           "disc_synthetic": 6, "candidates": 8, "threshold": 0.0, "min_kept": 0, "max_new_tokens": 8, "gen_batch": 8,
           "discriminator": small, "student": small, "eval_size": 6, "baseline": True, "out": str(tmp_path / "run")}
    s = tr.transfer(cfg)
    out = tmp_path / "run"
    seeds = [json.loads(x)["text"] for x in (out / "seeds.jsonl").read_text().splitlines()]
    syn = [json.loads(x) for x in (out / "synthetic.jsonl").read_text().splitlines()]
    cands = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(seeds) == 4 and syn and s["kept"] == len(syn) == s["student_train_rows"]
    assert [r["text"] for r in syn] == [c["text"] for c in cands if c["kept"]]
    assert not {r["text"] for r in syn} & set(seeds)  # never a real example
    st = json.loads(json.dumps(__import__("yaml").safe_load((out / "student" / "config.yaml").read_text())))
    assert st["data"]["path"] == str(out / "synthetic.jsonl") and st["model"]["name"] == str(tmp_path / "target")
    # the labels are the teacher's (recomputed here through the task with the teacher loaded afresh)
    task = get_task("sentiment-smollm2", DataSection(task="sentiment-smollm2", eval_size=4, max_length=64))
    task.rows()
    teacher, tok = task.load_model(tiny_dir)
    lorakit.load_adapter(teacher, teacher_dir)
    assert [r["label"] for r in syn] == tr.teacher_labels(task, teacher, tok, [r["text"] for r in syn])
    assert set(s) >= {"source", "student", "baseline_seeds", "target_base", "acceptance"}
    # balance: distil again from the same synthetic set; the student's file is the teacher-labelled kept candidates cut
    # to the smaller class's count per class, the most real-looking of each class (recomputed here from the files)
    teach = {r["text"]: r["label"] for r in syn}
    counts = {c: sum(y == c for y in teach.values()) for c in ("negative", "positive")}
    n = min(counts.values())
    assert 0 < n < max(counts.values())  # both classes present and unequal (5 vs 3 here): the cut is not vacuous
    b = tr.distil({**cfg, "balance": True, "baseline": False})
    bal = [json.loads(x) for x in (out / "synthetic.jsonl").read_text().splitlines()]
    want = set()
    for c in ("negative", "positive"):
        mine = sorted((x for x in cands if x["kept"] and teach[x["text"]] == c), key=lambda x: -x["p_real"])
        want |= {x["text"] for x in mine[:n]}
    assert {r["text"] for r in bal} == want and len(bal) == 2 * n == b["student_train_rows"]
    assert all(r["label"] == teach[r["text"]] for r in bal)
    assert b["label_counts"] == counts and b["label_counts_balanced"] == {"negative": n, "positive": n}


def test_bad_transfer_options():
    with pytest.raises(ConfigError, match="shots"):
        tr.make_config({"seeds": 2, "shots": 3})
    with pytest.raises(ConfigError, match="threshold"):
        tr.make_config({"threshold": 1.5})
    with pytest.raises(ConfigError, match="unknown key"):
        tr.make_config({"seed_examples": 3})
    with pytest.raises(ConfigError, match="source_adapter"):
        tr.transfer({})


def test_min_kept_tops_up_with_the_most_real_looking_rest():
    texts, p = ["a", "b", "c", "d"], [0.1, 0.9, 0.3, 0.2]
    assert tr.keep_real(texts, p, 0.5) == ["b"]
    assert tr.keep_real(texts, p, 0.5, min_kept=3) == ["b", "c", "d"]
    assert tr.keep_real(texts, p, 0.05, min_kept=2) == texts


def test_balance_keeps_the_smallest_class_count_of_each_class_most_real_first():
    labels = ["pos", "neg", "pos", "pos", "neg", "pos", "neg"]
    p = [0.2, 0.9, 0.8, 0.8, 0.1, 0.95, 0.5]
    idx = tr.balance_labels(labels, p, ["neg", "pos"])
    assert idx == [1, 2, 3, 4, 5, 6]  # neg: all 3; pos: 0.95, 0.8, 0.8 (the earlier 0.8 first), not the 0.2
    assert [labels[i] for i in idx].count("pos") == [labels[i] for i in idx].count("neg") == 3
    assert tr.balance_labels(["a", "b", "b", "b"], [0.1, 0.9, 0.2, 0.3], ["a", "b"]) == [0, 1]
    with pytest.raises(ConfigError, match="balance"):
        tr.balance_labels(["pos", "pos"], [0.5, 0.6], ["neg", "pos"])


def test_cli_temp_lora_and_transfer_baseline(tiny_dir, tmp_path, capsys):
    from lorakit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 6)
    out = tmp_path / "r.json"
    assert main(["temp-lora", "perplexity", f"model.name={tiny_dir}", f"text.file={text}", "temp_lora.chunk=16",
                 "temp_lora.window=8", "temp_lora.adapter.r=2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["chunks"] >= 3 and "perplexity" in capsys.readouterr().out
    assert main(["temp-lora", "generate", f"model.name={tiny_dir}", "temp_lora.chunk=4", "temp_lora.adapter.r=2",
                 "--prompt", "Once upon", "--max-new-tokens", "8"]) == 0
    assert main(["temp-lora", "perplexity", "temp_lora.window=0"]) == 2  # bad option: before any model loads
    assert main(["transfer", f"transfer.source_model={tiny_dir}", f"transfer.target_model={tiny_dir}",
                 "transfer.target_drop_layers=[]", "transfer.seeds=4", "transfer.shots=2", "transfer.eval_size=4",
                 "transfer.student.train.steps=1", f"transfer.out={tmp_path / 'b'}", "--baseline-only"]) == 0
    assert "seeds alone" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "baseline.json").read_text())["seeds"] == 4
