"""ICM-LoRA (arXiv:2501.17635): exact flatten/unflatten, normalise round trip, the condition is the last hidden state
of the base model on the in-context prompt, and the CVAE learns to generate each task's adapter from its condition."""
import pytest
import torch

import lorakit
from lorakit import icm
from conftest import tiny_llama


def test_flatten_round_trip_is_exact_across_dtypes():
    g = torch.Generator().manual_seed(0)
    sd = {"b.lora_B.weight": torch.randn(5, 2, generator=g).to(torch.bfloat16),
          "a.lora_A.weight": torch.randn(2, 7, generator=g),
          "c.scale": torch.randn(3, generator=g).half()}
    vec, layout = icm.flatten_adapter(sd)
    assert [k for k, _, _ in layout.entries] == sorted(sd) and vec.numel() == 10 + 14 + 3
    back = icm.unflatten_adapter(vec, layout)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    with pytest.raises(lorakit.LorakitError, match="layout needs"):
        icm.unflatten_adapter(vec[:-1], layout)


def test_normalizer_round_trip():
    v = torch.randn(6, 40, dtype=torch.float64) * 3 + 1
    n = icm.Normalizer.fit(v)
    assert torch.allclose(n.decode(n.encode(v)), v, atol=1e-5)
    assert torch.allclose(n.encode(v).mean(0), torch.zeros(40), atol=1e-5)


class _Tok:
    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[3 + (ord(ch) % 60) for ch in text]])
        return type("E", (), {"input_ids": ids})()


def test_condition_is_the_base_models_last_hidden_state():
    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": "all-linear", "r": 2})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_()
    c = icm.task_condition(m, _Tok(), ["great film", "awful plot"])
    ref_model = tiny_llama()
    ids = _Tok()("great film\n\nawful plot").input_ids
    with torch.no_grad():
        ref = ref_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(c, ref, atol=1e-5)


def test_cvae_generates_a_loadable_adapter_close_to_the_task(tmp_path):
    # two "tasks", each with adapters scattered around its own centre (checkpoints of a run)
    m = tiny_llama()
    cfg = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2}
    dirs, conds, vecs = [], [], []
    g = torch.Generator().manual_seed(0)
    centres = {}
    for task in range(2):
        lorakit.attach(m, cfg, name="t")
        centre = {p: torch.randn(a.lora_B.weight.shape, generator=g) for p, a in lorakit.adapters(m, "t")}
        centres[task] = centre
        for ck in range(6):
            with torch.no_grad():
                for p, a in lorakit.adapters(m, "t"):
                    a.lora_B.weight.copy_(centre[p] + 0.05 * torch.randn(a.lora_B.weight.shape, generator=g))
            d = tmp_path / f"t{task}_{ck}"
            lorakit.save_adapter(m, d, name="t")
            v, layout = icm.adapter_vector(d)
            dirs.append(d)
            vecs.append(v)
            conds.append(torch.tensor([1.0, 0.0]) if task == 0 else torch.tensor([0.0, 1.0]))
        lorakit.detach(m, "t")
    X, C = torch.stack(vecs), torch.stack(conds)
    model, norm, losses = icm.train_cvae(X, C, epochs=150, latent_dim=4, channels=8, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    for task in range(2):
        out = icm.generate_adapter(model, norm, C[6 * task], layout, dirs[0], tmp_path / f"gen{task}")
        fresh = tiny_llama()
        lorakit.load_adapter(fresh, out)  # loadable, right shapes
        gen, _ = icm.adapter_vector(out)
        own = X[6 * task:6 * task + 6].mean(0)
        other = X[6 * (1 - task):6 * (1 - task) + 6].mean(0)
        assert (gen - own).norm() < 0.5 * (gen - other).norm()  # the condition selects the task
