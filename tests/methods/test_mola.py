import torch

import lorakit
from lorakit.methods.mola import mola_config
from conftest import tiny_llama
from _moe import attached, fill, x


def test_expert_counts_follow_layer_schedule(tmp_path):
    m = tiny_llama(layers=4)
    lorakit.attach(m, mola_config(m, ["q_proj", "v_proj"], [2, 4], r=2))
    got = {p: a.E for p, a in lorakit.adapters(m)}
    assert got["model.layers.0.self_attn.q_proj"] == 2 and got["model.layers.1.self_attn.v_proj"] == 2
    assert got["model.layers.2.self_attn.q_proj"] == 4 and got["model.layers.3.self_attn.v_proj"] == 4
    lorakit.save_adapter(m, tmp_path / "a")
    fresh = tiny_llama(layers=4)
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert {p: a.E for p, a in lorakit.adapters(fresh)} == got


def test_top_k_uses_k_experts_and_forced_router_shows_in_load():
    m = attached("mola", r=2, num_experts=4, top_k=2)
    fill(m)
    m.train()
    m(x())
    for _, a in lorakit.adapters(m):
        assert ((a._weights > 0).sum(-1) == 2).all()
        torch.testing.assert_close(a._weights.sum(-1), torch.ones_like(a._weights.sum(-1)))
        with torch.no_grad():
            a.router.weight.zero_()
            a.router.weight[3] = 0
            a.router.weight[3, :] = 50.0 * torch.sign(torch.ones(a.view.d_in))
    m(x().abs())  # positive inputs: expert 3 dominates lin0
    st = dict(lorakit.adapters(m))["lin0"].stats()
    assert st["moe_load_e3"] > 0.45 and st["moe_load_max"] > 1.8
