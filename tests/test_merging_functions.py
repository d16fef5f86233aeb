"""Merge functions on tensors: the C0 invariants (methods-training.md), the formulas written out independently here,
and tensor-level parity with PEFT's merge_utils (test-only import)."""
from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.merging import functions as F


def _tasks(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_ties_on_one_task_with_density_one_is_w_tau():
    (t,) = _tasks(1)
    torch.testing.assert_close(F.ties([t], [0.7], 1.0), 0.7 * t)


def test_ties_on_identical_tasks_returns_the_task():
    (t,) = _tasks(1)
    torch.testing.assert_close(F.ties([t, t, t], [1.0, 1.0, 1.0], 1.0), t)


def test_dare_with_density_one_is_the_identity():
    ts = _tasks(2)
    torch.testing.assert_close(F.dare_linear(ts, [0.5, 2.0], 1.0), 0.5 * ts[0] + 2.0 * ts[1])
    torch.testing.assert_close(F.prune_random(ts[0], 1.0), ts[0])


def test_dare_keeps_the_mean():
    torch.manual_seed(0)
    t = torch.randn(40, 50, dtype=torch.float64)
    mean = torch.stack([F.prune_random(t, 0.3) for _ in range(400)]).mean(0)
    # E[m t / d] = t; the Monte-Carlo error of one entry is |t| sqrt((1-d)/(d N)) ~ 0.08 |t|
    rel = (mean - t).norm() / t.norm()
    assert rel < 0.1
    # and each draw does drop about 70 % of the entries and rescale the rest by 1/0.3
    one = F.prune_random(t, 0.3)
    kept = one != 0
    assert 0.25 < kept.double().mean() < 0.35
    torch.testing.assert_close(one[kept], t[kept] / 0.3)


def test_magnitude_prune_keeps_exactly_int_density_numel():
    (t,) = _tasks(1, shape=(10, 7))
    p = F.prune_magnitude(t, 0.3)
    k = int(0.3 * t.numel())
    assert int((p != 0).sum()) == k
    # the kept ones are the k largest magnitudes
    thresh = t.abs().flatten().sort(descending=True).values[k - 1]
    assert bool((p[p != 0].abs() >= thresh).all())


def test_ties_matches_the_paper_formula_written_out():
    ts = _tasks(3, shape=(8, 9), seed=3)
    w, d = [0.5, 1.0, 2.0], 0.4
    # trim: top-k per task; elect: sign of the sum of trimmed (unweighted) tasks; disjoint mean over agreeing
    trimmed = []
    for t in ts:
        k = int(d * t.numel())
        keep = t.abs().flatten().argsort(descending=True)[:k]
        m = torch.zeros(t.numel(), dtype=t.dtype)
        m[keep] = 1
        trimmed.append(t * m.view_as(t))
    gamma = torch.where(sum(trimmed) >= 0, 1.0, -1.0).to(torch.float64)
    num = sum(wi * ti * (torch.sign(ti) == gamma) for wi, ti in zip(w, trimmed))
    cnt = sum((torch.sign(ti) == gamma).double() for ti in trimmed).clamp(min=1)
    torch.testing.assert_close(F.ties(ts, w, d), num / cnt)


def test_frequency_sign_election():
    a = torch.tensor([[3.0, -1.0]])
    b = torch.tensor([[-1.0, 1.0]])
    c = torch.tensor([[-1.0, 1.0]])
    # total: 3-1-1 = +1 -> +; frequency: -1 wins 2:1 in column 0
    assert F.ties([a, b, c], [1, 1, 1], 1.0, majority_sign="total")[0, 0] == 3.0
    assert F.ties([a, b, c], [1, 1, 1], 1.0, majority_sign="frequency")[0, 0] == -1.0


def test_mergekit_flavor_normalises_by_agreeing_weights():
    a = torch.tensor([[2.0, -4.0]])
    b = torch.tensor([[4.0, 2.0]])
    out = F.ties([a, b], [1.0, 3.0], 1.0, flavor="mergekit")
    # column 0: both agree: (1*2 + 3*4) / (1 + 3); column 1: weighted sign sum -4 + 6 > 0 -> only b: 3*2/3
    torch.testing.assert_close(out, torch.tensor([[14.0 / 4.0, 2.0]]))


def test_task_arithmetic_with_lambda():
    ts = _tasks(2)
    torch.testing.assert_close(F.task_arithmetic(ts, [1.0, -0.5], lam=0.3), 0.3 * (ts[0] - 0.5 * ts[1]))


def test_svd_factors_exact_at_numerical_rank_and_best_at_lower_rank():
    g = torch.Generator().manual_seed(1)
    B0, A0 = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)
    d = B0 @ A0
    A, B = F.svd_factors(d, None)
    assert A.shape[0] == 3
    torch.testing.assert_close(B @ A, d, atol=1e-5, rtol=1e-5)
    A2, B2 = F.svd_factors(d, 2)
    s = torch.linalg.svdvals(d)
    assert abs(float((d - B2 @ A2).norm()) - float(s[2])) < 1e-4  # Eckart-Young


def test_bad_density_and_shapes_are_config_errors():
    ts = _tasks(2)
    with pytest.raises(ConfigError, match="density"):
        F.ties(ts, [1, 1], 1.5)
    with pytest.raises(ConfigError, match="shapes"):
        F.task_arithmetic([ts[0], ts[0].t()], [1, 1])
    with pytest.raises(ConfigError, match="weights"):
        F.task_arithmetic(ts, [1])


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_equals_peft_merge_utils(name):
    mu = pytest.importorskip("peft.utils.merge_utils")
    ts = _tasks(3, shape=(7, 11), seed=5)
    ts = [t.float() for t in ts]
    w = [0.6, -0.4, 1.3]
    wt = torch.tensor(w)
    kw = {} if name == "task_arithmetic" else {"density": 0.35}
    torch.manual_seed(123)
    ref = getattr(mu, name)(ts, wt, **kw)
    torch.manual_seed(123)  # same draws for DARE: both use torch.bernoulli on the global generator, in task order
    ours = getattr(F, name)(ts, w, **kw)
    torch.testing.assert_close(ours, ref)
