"""NOLA mechanism: A = A0 + Σ α_i A_i and B = Σ β_j B_j with frozen U(−1,1)/√k bases regenerated from the seed;
only the coefficients train and the adapter file holds nothing else."""
import torch
from safetensors.torch import load_file

import lorakit
from conftest import MLP, run

OPTS = {"method": "nola", "targets": ["lin0", "lin1"], "r": 3, "alpha": 6.0, "num_basis_A": 5, "num_basis_B": 4,
        "basis_seed": 11}


def test_combination_of_frozen_bases_as_the_reference(tmp_path):
    """Reference UCDvision/NOLA ``gpt/src/model_nola.py``: ``LoRA(use_nola=True)`` = ``lora_B(lora_A(x)) · α/r`` with
    ``NOLALinear`` weights ``W = weight + Σ c_b · basis_b``; ``GenerateParams`` draws the bases
    ``U(−1, 1)/√num_basis``; A's offset ``weight`` is ``kaiming_uniform_(a=√5)``, B's is 0, the coefficients start at
    0. Written here from the adapter's frozen buffers (not lorakit's helper)."""
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, OPTS)
    a = dict(lorakit.adapters(m))["lin0"]
    assert a.delta_weight().abs().max() == 0  # coefficients 0 and B's offset 0
    train = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert train == {"nola_alpha", "nola_beta"}
    A0, Ab, Bb = a.bases.A0, a.bases.Ab, a.bases.Bb
    assert A0.shape == (3, 12) and Ab.shape == (5, 3, 12) and Bb.shape == (4, 16, 3)
    assert not any(b.requires_grad for b in (A0, Ab, Bb))
    assert A0.abs().max() <= 1 / 12 ** 0.5  # kaiming_uniform(a=√5) on (r, d_in): bound 1/√fan_in
    assert Ab.abs().max() <= 1 / 5 ** 0.5 and Bb.abs().max() <= 1 / 4 ** 0.5  # U(−1, 1)/√num_basis
    with torch.no_grad():
        a.nola_alpha.normal_()
        a.nola_beta.normal_()
    A = A0 + sum(a.nola_alpha[i] * Ab[i] for i in range(5))  # NOLALinear: weight + Σ c·basis
    B = sum(a.nola_beta[j] * Bb[j] for j in range(4))
    x = torch.randn(4, 12)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, m.lin0.base_layer.weight, m.lin0.base_layer.bias) + (x @ A.T @ B.T) * (6.0 / 3)
        torch.testing.assert_close(m.lin0(x), ref, rtol=1e-5, atol=1e-5)
    out = run(m, x).detach()
    lorakit.save_adapter(m, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"nola_alpha", "nola_beta"}
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path)  # the bases come back from the seed alone
    assert torch.equal(run(fresh, x), out)


def test_bases_are_uniform_with_the_reference_scale():
    """Moments of ``U(−1, 1)/√k``: mean 0, variance 1/(3k); A's offset: kaiming-uniform variance 1/(3·d_in)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 128))
    lorakit.attach(m, {"method": "nola", "targets": ["0"], "r": 8, "num_basis_A": 64, "num_basis_B": 32})
    a = dict(lorakit.adapters(m))["0"]
    for t, k in ((a.bases.Ab, 64), (a.bases.Bb, 32)):
        assert abs(float(t.mean())) < 3e-3
        assert abs(float(t.var()) * 3 * k - 1) < 0.02
        assert float(t.abs().max()) <= 1 / k ** 0.5
    assert abs(float(a.bases.A0.var()) * 3 * 256 - 1) < 0.1
    other = torch.nn.Sequential(torch.nn.Linear(256, 128))  # same seed and shape: the same bases (reproducible)
    lorakit.attach(other, {"method": "nola", "targets": ["0"], "r": 8, "num_basis_A": 64, "num_basis_B": 32})
    assert torch.equal(dict(lorakit.adapters(other))["0"].bases.Ab, a.bases.Ab)


def test_param_count_independent_of_layer_size_and_bases_per_shape():
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {**OPTS, "targets": ["lin0", "lin1", "out"]})
    ads = dict(lorakit.adapters(m))
    assert ads["lin0"].bases is not ads["lin1"].bases  # different shapes: own bases
    assert not torch.equal(ads["lin1"].bases.Bb[:, :10], ads["out"].bases.Bb)  # (16,16) vs (10,16)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 3 * (5 + 4)
