"""NOLA mechanism: A = A0 + Σ α_i A_i and B = Σ β_j B_j from bases regenerated from the seed; only the
coefficients train and the adapter file holds nothing else."""
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.methods.nola import nola_bases
from conftest import MLP, run

OPTS = {"method": "nola", "targets": ["lin0", "lin1"], "r": 3, "alpha": 6.0, "num_basis_A": 5, "num_basis_B": 4,
        "basis_seed": 11}


def test_combination_of_seeded_bases(tmp_path):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, OPTS)
    a = dict(lorakit.adapters(m))["lin0"]
    assert a.delta_weight().abs().max() == 0
    train = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert train == {"nola_alpha", "nola_beta"}
    with torch.no_grad():
        a.nola_alpha.normal_()
        a.nola_beta.normal_()
    ref = nola_bases(11, 3, 12, 16, 5, 4)  # regenerated independently from the seed
    A = ref["A0"] + sum(a.nola_alpha[i] * ref["Ab"][i] for i in range(5))
    B = sum(a.nola_beta[j] * ref["Bb"][j] for j in range(4))
    assert torch.allclose(a.A, A, atol=1e-6) and torch.allclose(a.B, B, atol=1e-6)
    assert torch.allclose(a.delta_weight(), 2.0 * B @ A, atol=1e-5)
    x = torch.randn(4, 12)
    out = run(m, x).detach()
    lorakit.save_adapter(m, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"nola_alpha", "nola_beta"}
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(run(fresh, x), out)


def test_param_count_independent_of_layer_size_and_bases_per_shape():
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {**OPTS, "targets": ["lin0", "lin1", "out"]})
    ads = dict(lorakit.adapters(m))
    assert ads["lin0"].bases is not ads["lin1"].bases  # different shapes: own bases
    assert not torch.equal(ads["lin1"].bases.Bb[:, :10], ads["out"].bases.Bb)  # (16,16) vs (10,16)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 3 * (5 + 4)
