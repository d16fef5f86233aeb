"""AdaLink mechanism: only the embedding-side adapter changes outputs (e' = e + W_up W_down e), the transformer's
weights stay bit-identical through training, and the linear adapter folds into the embedding table."""
import pytest
import torch

import lorakit
from conftest import run, tiny_llama, _ids


def test_embedding_side_only_and_non_intrusive():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _ids()
    base_out = run(model, x).detach()
    lorakit.attach(model, {"method": "adalink", "targets": ["embed_tokens"], "r": 3})
    assert [p for p, _ in lorakit.adapters(model)] == ["model.embed_tokens"]
    assert torch.equal(run(model, x), base_out)  # W_up = 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        run(model, x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    a = dict(lorakit.adapters(model))["model.embed_tokens"]
    e = model.model.embed_tokens.base_layer(x)
    ref = e + e @ a.adalink_down.weight.T @ a.adalink_up.weight.T
    assert torch.allclose(model.model.embed_tokens(x), ref, atol=1e-6)
    assert not torch.allclose(run(model, x), base_out)
    for k, v in model.state_dict().items():  # every base tensor (blocks, head, table) untouched
        k0 = k.replace(".base_layer", "")
        if k0 in before:
            assert torch.equal(v, before[k0]), k
    out = run(model, x).detach()
    with lorakit.merged(model):  # E' = E (I + W_downᵀ W_upᵀ)
        E = model.model.embed_tokens.base_layer.weight
        assert torch.allclose(E, before["model.embed_tokens.weight"] @ (torch.eye(32) + a.adalink_down.weight.T
                                                                        @ a.adalink_up.weight.T), atol=1e-6)
        assert torch.allclose(run(model, x), out, atol=1e-5)


def test_nonlinear_variant_refuses_merge():
    model = tiny_llama()
    lorakit.attach(model, {"method": "adalink", "targets": ["embed_tokens"], "r": 3, "activation": "gelu"})
    with pytest.raises(lorakit.MergeError):
        lorakit.merge_and_unload(model)
