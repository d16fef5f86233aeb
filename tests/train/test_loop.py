"""The training loop on tiny local models: outputs, exact resume, faults (NaN, Ctrl-C, bad data, bad dirs), and the
method-agnostic hooks (calibration, extra_loss, controllers, batch_context)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY, register
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoRA
from lorakit.train import NonFiniteLossError, TrainingInterrupted, lr_lambda, run_training
from lorakit.train.checkpoint import latest_checkpoint

from .conftest import tiny_cfg


def test_train_writes_adapter_metrics_config_and_learns(tiny_lm_dir, cls_data, tmp_path):
    r = run_training(tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "run", steps=12))
    out = tmp_path / "run"
    assert r["status"] == "completed" and r["steps"] == 12 and len(r["loss_curve"]) == 12
    assert r["metrics_after"]["loss"] < r["metrics_before"]["loss"]
    assert {"accuracy", "macro_f1", "loss"} <= set(r["metrics_after"])
    assert r["trainable_params"] > 0 and r["peak_rss_mb"] > 0 and r["tokens_per_s"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "config.yaml").is_file()
    events = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in events if e["event"] == "eval"] == ["before", "after"]
    assert sum(e["event"] == "train" for e in events) == 12
    # the saved adapter reloads onto a fresh base and reproduces the final metrics
    from lorakit.tasks import get_task
    from lorakit.train import resolve

    cfg = resolve(out / "config.yaml")
    t = get_task(cfg.data.task, cfg.data)
    rows = t.rows()
    model, tok = t.load_model(cfg.model.name)
    lorakit.load_adapter(model, out / "adapter")
    m = t.evaluate(model, tok, t.encode(rows["eval"], tok))
    assert m["loss"] == pytest.approx(r["metrics_after"]["loss"], rel=1e-5)


@pytest.mark.parametrize("procedure", ["adamw", "loraplus"])
def test_resume_repeats_the_uninterrupted_loss_curve_exactly(tiny_bert_dir, cls_data, tmp_path, procedure):
    # dropout on (BERT 0.1), grad accumulation, warmup+cosine, the training procedure: all of it must be restored
    base = tiny_cfg(tiny_bert_dir, cls_data, tmp_path / "full", task="classify-encoder", steps=8, grad_accum=2,
                    save_every=3)
    base["optim"]["name"] = procedure
    full = run_training(base)

    class StopAt:
        def on_step(self, step, logs):
            if step == 5:  # after the checkpoint at step 3: steps 4-5 are lost and must be redone identically
                raise KeyboardInterrupt

    cut = dict(base, output={"dir": str(tmp_path / "cut")})
    with pytest.raises(TrainingInterrupted) as ei:
        run_training(cut, callbacks=[StopAt()])
    assert ei.value.step == 5 and ei.value.checkpoint.name == "step-000005"
    resumed = run_training(cut, resume=True)
    assert resumed["loss_curve"] == full["loss_curve"]  # bit-exact
    assert resumed["metrics_after"] == full["metrics_after"]
    a = lorakit.io._read_tensors(tmp_path / "full" / "adapter")
    b = lorakit.io._read_tensors(tmp_path / "cut" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_periodic_checkpoint(tiny_lm_dir, cls_data, tmp_path):
    base = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "a", steps=6, save_every=2, keep_checkpoints=1)
    full = run_training(base)
    assert [p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")] == ["step-000006"]
    part = dict(base, train={**base["train"], "steps": 6}, output={"dir": str(tmp_path / "b")})

    class Crash:
        def on_step(self, step, logs):
            if step == 3:
                raise RuntimeError("power cut")  # not Ctrl-C: no checkpoint of its own

    with pytest.raises(RuntimeError):
        run_training(part, callbacks=[Crash()])
    assert latest_checkpoint(tmp_path / "b").name == "step-000002"
    assert run_training(part, resume=True)["loss_curve"] == full["loss_curve"]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_lm_dir, cls_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "nan", steps=8, save_every=2)

    class Poison:
        def on_step(self, step, logs):
            if step == 3:
                model = Poison.model
                for _, a in lorakit.adapters(model):
                    a.lora_A.weight.data.fill_(float("nan"))

    import lorakit.train.loop as loop

    orig = loop.inject.attach

    def spy(model, *a, **k):
        Poison.model = model
        return orig(model, *a, **k)

    loop.inject.attach = spy
    try:
        with pytest.raises(NonFiniteLossError, match="loss became nan at step 4.*Last good checkpoint.*step-000002"):
            run_training(cfg, callbacks=[Poison()])
    finally:
        loop.inject.attach = orig
    assert latest_checkpoint(tmp_path / "nan").name == "step-000002"
    ev = [json.loads(ln) for ln in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert ev[-1]["event"] == "error"


def test_ctrl_c_saves_checkpoint_and_resume_finishes(tiny_lm_dir, cls_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "int", steps=5)

    class CtrlC:
        def on_step(self, step, logs):
            if step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as ei:
        run_training(cfg, callbacks=[CtrlC()])
    assert ei.value.checkpoint.is_dir() and (ei.value.checkpoint / "adapter_model.safetensors").is_file()
    r = run_training(cfg, resume=True)
    assert r["steps"] == 5 and len(r["loss_curve"]) == 5


def test_sigint_mid_step_stops_at_the_step_boundary_and_resume_is_exact(tiny_lm_dir, cls_data, tmp_path):
    """A real SIGINT landing inside a step (here: inside the optimizer's step, after the parameters moved) only
    asks the loop to stop; the step completes, the checkpoint is consistent and resuming repeats the
    uninterrupted run exactly. A second SIGINT interrupts at once."""
    import signal

    # the test process may have been started with SIGINT ignored (a background job): make it Python's default
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_mid_step(tiny_lm_dir, cls_data, tmp_path)
    finally:
        signal.signal(signal.SIGINT, saved)


def _sigint_mid_step(tiny_lm_dir, cls_data, tmp_path):
    import os
    import signal

    base = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "full", steps=6)
    full = run_training(base)
    cut = dict(base, output={"dir": str(tmp_path / "cut")})
    calls = {"n": 0}
    orig_step = torch.optim.AdamW.step

    def step_then_sigint(self, *a, **k):
        out = orig_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # delivered right here, before the loop counts the step
        return out

    torch.optim.AdamW.step = step_then_sigint
    try:
        with pytest.raises(TrainingInterrupted) as ei:
            run_training(cut)
    finally:
        torch.optim.AdamW.step = orig_step
    assert ei.value.step == 3 and ei.value.checkpoint.name == "step-000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = run_training(cut, resume=True)
    assert resumed["loss_curve"] == full["loss_curve"]

    class TwiceAt2:
        def on_step(self, step, logs):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # the second one raises inside this callback

    with pytest.raises(TrainingInterrupted) as ei:
        run_training(dict(base, output={"dir": str(tmp_path / "twice")}), callbacks=[TwiceAt2()])
    assert ei.value.step == 2


def test_an_ignored_sigint_stays_ignored(tiny_lm_dir, cls_data, tmp_path):
    """A run started with SIGINT ignored (e.g. `lorakit train &` from a script) does not take Ctrl-C over: a SIGINT
    mid-run changes nothing and the disposition is still SIG_IGN afterwards."""
    import os
    import signal

    class SigintAt2:
        def on_step(self, step, logs):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        res = run_training(tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "ign", steps=4), callbacks=[SigintAt2()])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved)
    assert res["status"] == "completed" and len(res["loss_curve"]) == 4


@pytest.mark.parametrize("rows,match", [
    ([{"text": "good movie"}], "no column 'label'"),
    ([], "empty"),
])
def test_bad_data(tiny_lm_dir, tmp_path, rows, match):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=match):
        run_training(tiny_cfg(tiny_lm_dir, p, tmp_path / "o"))


def test_label_outside_label_set(tiny_lm_dir, cls_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "o")
    cfg["data"]["labels"] = ["positive", "neutral"]
    with pytest.raises(ConfigError, match="label 'negative' is not in the label set"):
        run_training(cfg)


def test_csv_data_and_missing_csv_column(tiny_lm_dir, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\ngood movie,positive\n")
    with pytest.raises(ConfigError, match="no column 'text'"):
        run_training(tiny_cfg(tiny_lm_dir, p, tmp_path / "o"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_nonroot(tiny_lm_dir, cls_data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ConfigError, match="not writable"):
        run_training(tiny_cfg(tiny_lm_dir, cls_data, ro / "run"))


def test_unwritable_output_dir(tiny_lm_dir, cls_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="output.dir .* is not writable"):
        run_training(tiny_cfg(tiny_lm_dir, cls_data, blocker / "run"))


def test_config_typos_name_valid_keys(tiny_lm_dir, cls_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "o")
    cfg["train"]["stpes"] = 3
    with pytest.raises(ConfigError, match="unknown key 'train.stpes' \\(did you mean 'steps'\\?\\)"):
        run_training(cfg)
    cfg["train"].pop("stpes")
    cfg["optim"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="optim.lr"):
        run_training(cfg)
    cfg["optim"]["lr"] = 1e-3
    cfg["adapter"]["rank"] = 4
    with pytest.raises(ConfigError, match="rank"):
        run_training(cfg)


def test_sft_and_encoder_tasks(tiny_lm_dir, tiny_bert_dir, sft_data, cls_data, tmp_path):
    r = run_training(tiny_cfg(tiny_lm_dir, sft_data, tmp_path / "sft", task="sft", steps=8))
    assert r["metrics_after"]["loss"] < r["metrics_before"]["loss"]
    r = run_training(tiny_cfg(tiny_bert_dir, cls_data, tmp_path / "enc", task="classify-encoder", steps=8))
    assert r["config"]["adapter"]["trainable"] == ["classifier"]  # the head is trained (modules_to_save)
    assert r["metrics_after"]["loss"] < r["metrics_before"]["loss"]


def test_sft_loss_is_on_the_completion_only(tiny_lm_dir, sft_data):
    from lorakit.tasks import get_task
    from lorakit.train import resolve

    cfg = resolve(base=tiny_cfg(tiny_lm_dir, sft_data, "/tmp/unused", task="sft"))
    t = get_task("sft", cfg.data)
    rows = t.rows()
    _, tok = t.load_model(cfg.model.name)
    ex = t.encode(rows["train"][:2], tok)
    for e in ex:
        n = len(e["prompt"])
        assert e["labels"][:n] == [-100] * n and all(x != -100 for x in e["labels"][n:])
        assert tok.decode(e["labels"][n:]).split()[0] in ("positive", "negative")


def test_batched_greedy_answers_equal_one_row_at_a_time(tiny_lm_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lorakit.tasks.sft import greedy_answers

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir).eval()
    lorakit.attach(model, {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "seed": 1})
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the answers depend on it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    texts = ["Q the movie was good A", "Q bad A", "Q it is a very dull and boring plot but the acting A", "Q 1 2 A"]
    prompts = [tok(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 4  # left padding differs per row
    one = greedy_answers(model, tok, prompts, 6, tok.pad_token_id, batch_size=1)
    many = greedy_answers(model, tok, prompts, 6, tok.pad_token_id, batch_size=3)  # a batch of 3, then 1
    assert many == one and all(one) and len(set(one)) > 1


def test_lr_schedule():
    f = lr_lambda(100, 0.1, "cosine")
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == pytest.approx(1.0) and f(99) < 0.01
    assert lr_lambda(10, 2, "constant")(9) == 1.0
    assert lr_lambda(10, 0, "linear")(5) == pytest.approx(0.5)


# ---- the loop calls the generic hooks, with no per-method code ---------------------------------------------------
@pytest.fixture
def probe_method():
    seen = {"stats": None, "ctx": [], "before": [], "step": [], "begin": None}

    class Ctrl(lorakit.Controller):
        def __init__(self):
            self.count = 0

        def on_train_begin(self, model, optimizer, total_steps):
            seen["begin"] = total_steps

        def before_step(self, step, model, optimizer):
            seen["before"].append(any(p.grad is not None for _, a in lorakit.adapters(model) for p in a.parameters()))

        def step(self, step, model, optimizer):
            self.count += 1
            seen["step"].append(step)

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    @dataclass
    class Cfg(LoRA.Config):
        reg: float = 0.5

    class Probe(LoRA):
        Config = Cfg
        calibration = "activations"

        def init_from(self, W, stats):
            seen["stats"] = stats
            return None

        def forward(self, x, y):
            seen["ctx"].append(self.ctx.get("task_ids"))
            return super().forward(x, y)

        def extra_loss(self):
            return self.cfg.reg * self.lora_B.weight.pow(2).sum() + 1.0  # +1: visible in the logged total

        def stats(self):
            return {"b_norm": float(self.lora_B.weight.norm())}

        @classmethod
        def output_loss(cls, att, outputs, batch):
            seen.setdefault("outputs", []).append((tuple(outputs.logits.shape), sorted(batch)))
            return outputs.logits.float().pow(2).mean() * 0.0

        @classmethod
        def controller(cls, att):
            return Ctrl()

    register("probe_test", family="test", paper="none")(Probe)
    Probe.peft = None
    try:
        yield seen
    finally:
        REGISTRY.pop("probe_test", None)


def test_loop_runs_calibration_extra_loss_controllers_stats_and_batch_context(tiny_lm_dir, cls_data, tmp_path,
                                                                              probe_method, monkeypatch):
    from lorakit.tasks.classify import LMClassification

    orig = LMClassification.collate

    def with_task_ids(self, examples):
        b = orig(self, examples)
        b["task_ids"] = torch.arange(len(examples)) % 2
        return b

    monkeypatch.setattr(LMClassification, "collate", with_task_ids)
    monkeypatch.setattr(LMClassification, "context_keys", ("task_ids",))  # the trainer passes what a task declares
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "p", steps=3, calibration_batches=2)
    cfg["adapter"] = {"method": "probe_test", "targets": ["q_proj"], "r": 2}
    r = run_training(cfg)
    seen = probe_method
    assert seen["stats"] is not None and seen["stats"]["n"] > 0 and "cov" in seen["stats"]  # calibration batches
    assert seen["begin"] == 3 and seen["step"] == [0, 1, 2] and all(seen["before"])
    assert any(c is not None and c.tolist()[:2] == [0, 1] for c in seen["ctx"])  # batch_context(task_ids)
    ev = [json.loads(ln) for ln in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert "adapter/b_norm" in [e for e in ev if e["event"] == "train"][0]
    assert r["loss_curve"][0] < 10  # the task loss is logged; extra loss only enters the gradient
    # output_loss (BA-LoRA's regularisers) gets this forward's outputs and batch, once per micro-batch
    assert len(seen["outputs"]) == 3 and seen["outputs"][0][0][0] == cfg["data"]["batch_size"]
    assert "input_ids" in seen["outputs"][0][1]


def test_quantize_nf4_base_trains_and_changes_the_base(tiny_lm_dir, cls_data, tmp_path):
    plain = run_training(tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "f", steps=4))
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "q", steps=4)
    cfg["model"]["quantize"] = "nf4"
    q = run_training(cfg)
    b0, b1 = plain["metrics_before"]["loss"], q["metrics_before"]["loss"]
    assert b0 != b1 and abs(b0 - b1) < 0.05 * abs(b0)  # the NF4 base is close to, not equal to, the float base
    assert q["status"] == "completed" and all(x == x for x in q["loss_curve"])
    from lorakit.quant import QuantLinear
    from lorakit.tasks import get_task
    from lorakit.train import resolve

    c = resolve(tmp_path / "q" / "config.yaml")
    assert c.model.quantize == "nf4"
    t = get_task(c.data.task, c.data)
    t.rows()
    m, tok = t.load_model(c.model.name)
    from lorakit.quant import quantize_model

    quantize_model(m)
    assert any(isinstance(x, QuantLinear) for x in m.modules())
    lorakit.load_adapter(m, tmp_path / "q" / "adapter")  # the adapter reloads on the quantised base
    assert t.evaluate(m, tok, t.encode(t.rows()["eval"], tok))["loss"] == pytest.approx(
        q["metrics_after"]["loss"], rel=1e-5)


def test_trainable_lr_is_the_heads_rate(tiny_bert_dir, cls_data, tmp_path):
    from safetensors.torch import load_file

    heads = {}
    for lr in (0.0, 1e-2):
        cfg = tiny_cfg(tiny_bert_dir, cls_data, tmp_path / f"h{lr}", task="classify-encoder", steps=3)
        cfg["optim"]["trainable_lr"] = lr
        run_training(cfg)
        sd = load_file(str(tmp_path / f"h{lr}" / "adapter" / "adapter_model.safetensors"))
        heads[lr] = {k: v for k, v in sd.items() if "classifier" in k and k.endswith("weight")}
        lora = {k: v for k, v in sd.items() if "lora_B" in k}
        assert lora and all(v.abs().sum() > 0 for v in lora.values())  # the adapter trained at optim.lr
    from lorakit.tasks import get_task
    from lorakit.train import resolve
    from lorakit.train.loop import seed_everything

    c = resolve(tmp_path / "h0.0" / "config.yaml")
    t = get_task(c.data.task, c.data)
    t.rows()
    seed_everything(c.train.seed)
    m, _ = t.load_model(c.model.name)
    (k, frozen), = heads[0.0].items()
    assert torch.equal(frozen, m.classifier.weight.detach())  # rate 0: the head kept its initial values
    assert not torch.equal(heads[1e-2][k], frozen)
