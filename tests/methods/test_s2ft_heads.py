"""S2FT's attention-head unit on a tiny grouped-query Llama (8 query heads, 4 kv heads, head_dim 4: two query heads
per kv group): co-permuting q/k/v rows and o columns by whole kv groups keeps the function; permute -> train ->
unpermute changes only the selected groups' rows of v and columns of o (checked against the saved sparse delta and
the official ``only_v + vo + only_o + rest`` order, both written out here); detach is bit-exact even while merged;
merged == unmerged; the file is permutation-free, reloads (also into an attach that drew other heads) and is refused
on a base of other head geometry; BERT attention is refused; `lorakit train` runs the head option."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError, ConfigError, TargetError
from train.conftest import cls_data, tiny_lm_dir  # noqa: F401 - fixtures for the `lorakit train` smoke

HD, NH, NKV, HID = 4, 8, 4, 32
G = NH // NKV
HEADS = {"method": "s2ft", "targets": ["v_proj", "o_proj"], "ratio": 0.5, "seed": 1}


def gqa_llama(seed=0, hidden=HID, heads=NH, kv=NKV, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _train(m, x, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        m(x).logits.float().pow(2).mean().backward()
        opt.step()


def _rows(units, size):
    # unit u covers rows/columns u*size .. u*size+size-1
    return torch.tensor([u * size + j for u in units for j in range(size)], dtype=torch.int64)


def _official_order(V, O, n):
    # experiments/utils/s2_utils.py convert_mha_layer_to_s2: only_v + vo + only_o, then the remaining heads
    only_v, vo, only_o = sorted(set(V) - set(O)), sorted(set(V) & set(O)), sorted(set(O) - set(V))
    return only_v + vo + only_o + [h for h in range(n) if h not in set(V) | set(O)], len(only_v)


def _selection(layer, name="default"):
    v, o = layer.self_attn.v_proj.adapters[name], layer.self_attn.o_proj.adapters[name]
    return v, o, v._units.tolist(), o._units.tolist()


def test_head_permutation_keeps_the_function_and_moves_whole_kv_groups_with_their_query_heads():
    m, x = gqa_llama().double(), _ids()  # float64: the permuted model's function equals the original's to 1e-12
    w0, y0 = _weights(m), m(x).logits.detach()
    lorakit.attach(m, HEADS)
    assert torch.allclose(m(x).logits, y0, atol=1e-12, rtol=0)
    kinds = set()
    for i, layer in enumerate(m.model.layers):
        v, o, V, O = _selection(layer)
        assert len(V) == len(O) == round(0.5 * NKV)
        order, n_only_v = _official_order(V, O, NKV)
        kinds.add((len(set(V) & set(O)), n_only_v))
        kv, qo = _rows(order, HD), _rows(order, G * HD)  # a kv head's hd rows; its group's g query heads
        pre, at = f"model.layers.{i}.self_attn.", layer.self_attn
        assert torch.equal(at.q_proj.weight, w0[pre + "q_proj.weight"][qo])
        assert torch.equal(at.k_proj.weight, w0[pre + "k_proj.weight"][kv])
        assert torch.equal(at.v_proj.base_layer.weight, w0[pre + "v_proj.weight"][kv])
        assert torch.equal(at.o_proj.base_layer.weight, w0[pre + "o_proj.weight"][:, qo])
        # the trained blocks: v rows [0, |V|·hd), o columns [|only_v|·g·hd, (|only_v|+|O|)·g·hd)
        assert v.s2.shape == (len(V) * HD, HID) and (v._start, v._stop) == (0, len(V) * HD)
        assert o.s2.shape == (HID, len(O) * G * HD)
        assert (o._start, o._stop) == (n_only_v * G * HD, (n_only_v + len(O)) * G * HD)
    assert len(kinds) > 1  # the layers cover different overlaps of V and O (seed chosen for it)
    for k in w0:  # nothing outside the attention projections moved
        if "self_attn" not in k:
            assert torch.equal(m.state_dict()[k], w0[k]), k


def test_permute_train_unpermute_is_the_identity_outside_the_selected_heads(tmp_path):
    m, x = gqa_llama(), _ids()
    w0 = _weights(m)
    lorakit.attach(m, {**HEADS, "targets": ["v_proj", "o_proj", "down_proj"]})  # heads and FFN channels together
    _train(m, x)
    y = m(x).logits.detach()
    lorakit.save_adapter(m, tmp_path / "a")
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    lorakit.merge_and_unload(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5, rtol=1e-5)
    w = _weights(m)
    for i in range(len(m.model.layers)):
        pre = f"model.layers.{i}.self_attn."
        key = "base_model.model." + pre
        assert torch.equal(w[pre + "q_proj.weight"], w0[pre + "q_proj.weight"])  # original order again, bit for bit
        assert torch.equal(w[pre + "k_proj.weight"], w0[pre + "k_proj.weight"])
        rows, s2v = t[key + "v_proj.s2.rows"], t[key + "v_proj.s2.weight"]
        cols, s2o = t[key + "o_proj.s2.channels"], t[key + "o_proj.s2.weight"]
        V = sorted({int(r) // HD for r in rows})
        O = sorted({int(c) // (G * HD) for c in cols})
        assert torch.equal(rows, _rows(V, HD)) and torch.equal(cols, _rows(O, G * HD))  # whole units, ascending
        assert s2v.abs().sum() > 0 and s2o.abs().sum() > 0
        keep_v = torch.ones(NKV * HD, dtype=torch.bool)
        keep_v[rows] = False
        keep_o = torch.ones(NH * HD, dtype=torch.bool)
        keep_o[cols] = False
        dv, dv0 = w[pre + "v_proj.weight"], w0[pre + "v_proj.weight"]
        do, do0 = w[pre + "o_proj.weight"], w0[pre + "o_proj.weight"]
        assert torch.equal(dv[keep_v], dv0[keep_v]) and torch.equal(do[:, keep_o], do0[:, keep_o])
        assert torch.allclose(dv[rows], dv0[rows] + s2v, atol=1e-7)  # ΔW_v[rows, :] = s2
        assert torch.allclose(do[:, cols], do0[:, cols] + s2o, atol=1e-7)  # ΔW_o[:, cols] = s2
    for k in w0:
        if "self_attn" not in k and "mlp" not in k:
            assert torch.equal(w[k], w0[k]), k


def test_merged_equals_unmerged_and_detach_while_merged_is_bit_exact():
    m, x = gqa_llama(), _ids()
    w0 = _weights(m)
    lorakit.attach(m, HEADS)
    _train(m, x)
    y = m(x).logits.detach()
    lorakit.merge(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(m)
    assert torch.equal(m(x).logits, y)
    lorakit.merge(m)
    lorakit.detach(m)
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())
    assert not any(p.requires_grad is False for p in m.parameters())  # the flags it had before the attach


def test_detach_after_training_restores_the_base_bit_exactly():
    m, x = gqa_llama(), _ids()
    w0 = _weights(m)
    lorakit.attach(m, {**HEADS, "targets": ["o_proj"]})  # o alone: q/k/v all move as its producers
    _train(m, x)
    assert m.model.layers[0].self_attn.o_proj.adapters["default"].s2.abs().sum() > 0
    lorakit.detach(m)
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())


def test_save_load_round_trip_also_into_an_attach_that_drew_other_heads(tmp_path):
    m, x = gqa_llama(), _ids()
    lorakit.attach(m, HEADS)
    _train(m, x)
    y = m(x).logits.detach()
    lorakit.save_adapter(m, tmp_path / "a")
    m2 = gqa_llama()
    lorakit.load_adapter(m2, tmp_path / "a")
    assert torch.allclose(m2(x).logits, y, atol=1e-6, rtol=1e-6)
    # the same file under another seed: the attach draws other groups first, the file's ids then win
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    conf["lorakit"]["config"]["seed"] = 7
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(conf))
    m3 = gqa_llama()
    w0 = _weights(m3)
    lorakit.attach(m3, {**HEADS, "seed": 7}, "probe")
    drew = [_selection(layer, "probe")[2:] for layer in m3.model.layers]
    lorakit.detach(m3, "probe")
    assert drew != [_selection(layer)[2:] for layer in m.model.layers]  # the seed really draws other heads
    lorakit.load_adapter(m3, tmp_path / "a")
    assert torch.allclose(m3(x).logits, y, atol=1e-6, rtol=1e-6)
    lorakit.detach(m3)
    assert all(torch.equal(v, w0[k]) for k, v in m3.state_dict().items())


def test_a_file_for_another_head_geometry_is_refused_and_leaves_the_model_untouched(tmp_path):
    m = gqa_llama()
    lorakit.attach(m, HEADS)
    lorakit.save_adapter(m, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(str(f))
    key = "base_model.model.model.layers.0.self_attn.v_proj.s2.rows"
    # same tensor shapes, but rows 2..9 split kv heads of size 4: not whole units of this base
    save_file({**t, key: torch.arange(2, 10)}, str(f))
    w0 = _weights(m2 := gqa_llama())
    with pytest.raises(AdapterFileError, match="whole kv heads"):
        lorakit.load_adapter(m2, tmp_path / "a")
    assert all(torch.equal(v, w0[k]) for k, v in m2.state_dict().items()) and not lorakit.attached(m2)
    # 4 query heads and 2 kv heads of size 8 (the same v/o shapes, other heads), and a wider model
    lorakit.save_adapter(m, tmp_path / "b")
    for other in (gqa_llama(heads=4, kv=2), gqa_llama(hidden=48, heads=12, kv=6)):
        w1 = _weights(other)
        with pytest.raises(AdapterFileError, match="another base model"):
            lorakit.load_adapter(other, tmp_path / "b")
        assert all(torch.equal(v, w1[k]) for k, v in other.state_dict().items())


def test_bert_attention_is_refused_with_the_reason():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=32)).eval()
    w0 = _weights(bert)
    for t in (["attention.self.value"], ["attention.output.dense"]):
        with pytest.raises(TargetError, match="BERT/MiniLM attention"):
            lorakit.attach(bert, {**HEADS, "targets": t})
    assert all(torch.equal(v, w0[k]) for k, v in bert.state_dict().items())
    lorakit.attach(bert, {**HEADS, "targets": ["layer.0.output.dense"]})  # the FFN unit stays available on BERT


def test_bad_attention_option_and_a_producer_with_another_adapter_are_refused():
    with pytest.raises(ConfigError, match="attention must map q, k, v, o"):
        lorakit.attach(gqa_llama(), {**HEADS, "attention": {"q": "q_proj", "v": "v_proj"}})
    m = gqa_llama()
    w0 = _weights(m)
    lorakit.attach(m, {"method": "lora", "targets": ["k_proj"], "r": 2}, "other")
    with pytest.raises(TargetError, match="carries adapters"):
        lorakit.attach(m, HEADS)
    lorakit.detach(m, "other")
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())


def test_lorakit_train_with_the_head_recipe(tiny_lm_dir, cls_data, tmp_path):  # noqa: F811
    from lorakit.cli import main

    out = tmp_path / "run"
    args = [f"model.name={tiny_lm_dir}", f"data.path={cls_data}", "data.max_length=32",  # the default task
            "data.eval_size=8", "train.steps=2", f"output.dir={out}"]
    assert main(["train", "--method", "s2ft-heads", *args]) == 0
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())["lorakit"]
    assert any(p.endswith("self_attn.o_proj") for p in conf["paths"])
    t = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("o_proj.s2.channels") for k in t) and any(k.endswith("down_proj.s2.channels") for k in t)
    assert any(t[k].abs().sum() > 0 for k in t if k.endswith("o_proj.s2.weight"))  # the selected heads trained


def test_global_selection_draws_over_all_layers_and_files_carry_each_modules_count(tmp_path):
    m, x = gqa_llama(layers=4), _ids()
    w0 = _weights(m)
    cfg = {**HEADS, "targets": ["v_proj", "o_proj", "down_proj"], "ratio": 0.2, "seed": 0, "select": "global",
           "overrides": {"o_proj": {"ratio": 0.3}}}
    lorakit.attach(m, cfg)
    sel = [_selection(layer) for layer in m.model.layers]
    # the official count: int(ratio * units of all layers), spread at random over the layers
    assert sum(len(V) for _, _, V, _ in sel) == int(0.2 * 4 * NKV)
    assert sum(len(O) for _, _, _, O in sel) == int(0.3 * 4 * NKV)
    assert sum(layer.mlp.down_proj.adapters["default"].n for layer in m.model.layers) == int(0.2 * 4 * 64)
    empty = [i for i, (_, _, V, _) in enumerate(sel) if not V]
    assert empty and len(empty) < 4  # seed chosen so that some layer trains no value head, and some does
    for v, o, V, O in sel:
        assert v.s2.shape == (len(V) * HD, HID) and o.s2.shape == (HID, len(O) * G * HD)
    _train(m, x)
    y = m(x).logits.detach()
    lorakit.save_adapter(m, tmp_path / "a")
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    conf["lorakit"]["config"]["seed"] = 5  # another draw at attach: the file's per-module counts win on load
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(conf))
    m2 = gqa_llama(layers=4)
    lorakit.attach(m2, {**cfg, "seed": 5}, "probe")
    drew = [_selection(layer, "probe")[2:] for layer in m2.model.layers]
    lorakit.detach(m2, "probe")
    assert [len(V) for V, _ in drew] != [len(s[2]) for s in sel]  # the other seed spreads the heads differently
    lorakit.load_adapter(m2, tmp_path / "a")
    assert [_selection(layer)[2:] for layer in m2.model.layers] == [s[2:] for s in sel]
    assert torch.allclose(m2(x).logits, y, atol=1e-6, rtol=1e-6)
    lorakit.merge_and_unload(m)
    for i in empty:  # a layer without a selected value head: v_proj is bit-identical after training and merging
        k = f"model.layers.{i}.self_attn.v_proj.weight"
        assert torch.equal(m.state_dict()[k], w0[k])


@pytest.mark.slow
def test_smollm2_gqa_heads_keep_the_function_and_come_off_bit_exactly():
    from lorakit import assets

    m = assets.load_causal_lm("smollm2-135m")  # 9 query heads, 3 kv heads of 64: groups of 3 query heads
    m = m[0] if isinstance(m, tuple) else m
    m.eval()
    at = m.model.layers[0].self_attn
    assert (at.head_dim, at.num_key_value_groups) == (64, 3)
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    w0 = _weights(m)
    with torch.no_grad():
        y0 = m(x).logits
        lorakit.attach(m, {**HEADS, "ratio": 0.34})  # one kv group of three for v and for o in every layer
        y1 = m(x).logits
        v, o, V, O = _selection(m.model.layers[5])
        order, n_only_v = _official_order(V, O, 3)
        assert torch.equal(m.model.layers[5].self_attn.q_proj.weight,
                           w0["model.layers.5.self_attn.q_proj.weight"][_rows(order, 3 * 64)])
        assert v.s2.shape == (64, 576) and o.s2.shape == (576, 192) and o._start == n_only_v * 192
        o.s2.normal_(std=0.02)
        y2 = m(x).logits
    assert torch.allclose(y1, y0, atol=1e-3, rtol=1e-4)  # fp32 logits of magnitude ~20: summation order only
    assert not torch.allclose(y2, y0, atol=1e-2)
    lorakit.detach(m)
    assert all(torch.equal(t, w0[k]) for k, t in m.state_dict().items())


def test_another_adapter_is_refused_on_the_modules_s2ft_permutes():
    m = gqa_llama()
    lorakit.attach(m, {**HEADS, "targets": ["o_proj", "down_proj"]})
    w = _weights(m)
    for t in (["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"], ["up_proj"], ["gate_proj"], ["down_proj"]):
        with pytest.raises(TargetError, match="rewritten by adapter 'default'"):
            lorakit.attach(m, {"method": "lora", "targets": t, "r": 2}, "other")
        assert all(torch.equal(v, w[k]) for k, v in m.state_dict().items()) and set(lorakit.attached(m)) == {"default"}
    lorakit.attach(m, {"method": "lora", "targets": ["lm_head"], "r": 2}, "other")  # elsewhere: fine


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "olmo2", "mha"])
def test_other_attention_layouts(arch):
    """Qwen2 (q/k/v biases move with their rows), Qwen3 (q/k norms of one head's width, shared by every head) and
    plain multi-head attention (a unit is one head, as in the official code) keep their function; OLMo-2's q/k norms
    span all heads and would have to move too, so it is refused before anything changes."""
    import transformers

    kw = dict(vocab_size=64, hidden_size=HID, intermediate_size=64, num_hidden_layers=2, num_attention_heads=NH,
              num_key_value_heads=NKV, max_position_embeddings=64)
    name, extra = {"qwen2": ("Qwen2", {}), "qwen3": ("Qwen3", {"head_dim": HD}), "olmo2": ("Olmo2", {}),
                   "mha": ("Llama", {"num_key_value_heads": NH})}[arch]
    torch.manual_seed(0)
    m = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**{**kw, **extra}))
    m = m.eval().double()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_()
    x = _ids()
    w0, y0 = _weights(m), m(x).logits.detach()
    if arch == "olmo2":
        with pytest.raises(TargetError, match="q_norm.weight.*not shared by every head"):
            lorakit.attach(m, HEADS)
        assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())
        return
    lorakit.attach(m, HEADS)
    assert torch.allclose(m(x).logits, y0, atol=1e-12, rtol=0)
    at = m.model.layers[0].self_attn
    n_kv = extra.get("num_key_value_heads", NKV)
    _, _, V, O = _selection(m.model.layers[0])
    order, _ = _official_order(V, O, n_kv)
    g = NH // n_kv
    if at.q_proj.bias is not None:
        assert torch.equal(at.q_proj.bias, w0["model.layers.0.self_attn.q_proj.bias"][_rows(order, g * HD)])
        assert torch.equal(at.v_proj.base_layer.bias, w0["model.layers.0.self_attn.v_proj.bias"][_rows(order, HD)])
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.s2.normal_()
    y = m(x).logits.detach()
    lorakit.merge_and_unload(m)
    assert (m(x).logits - y).abs().max() <= 1e-5 * y.abs().max()  # the host merges in fp32
