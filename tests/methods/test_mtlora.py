import torch

import lorakit
from lorakit.methods.mtlora import export_task
from _moe import attached, fill, x


def test_task_id_selects_task_module_and_export(tmp_path):
    m = attached("mtlora", r=2, r_task=2, n_tasks=3)
    fill(m)
    xi = x()
    a = dict(lorakit.adapters(m))["lin0"]
    t = torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        with lorakit.batch_context(m, task_ids=t):
            out = a.delta(xi)
        assert torch.equal(a.delta(xi), a.delta(xi))
        default = a.delta(xi)  # no context -> task 0
    for b in range(6):
        A, B = a.task_lowrank(int(t[b]))
        torch.testing.assert_close(out[b], xi[b] @ A.t() @ B.t(), rtol=1e-5, atol=1e-5)
        A0, B0 = a.task_lowrank(0)
        torch.testing.assert_close(default[b], xi[b] @ A0.t() @ B0.t(), rtol=1e-5, atol=1e-5)
    with lorakit.batch_context(m, task_ids=torch.full((6,), 2)):
        want = m(xi).detach()
    export_task(m, tmp_path / "t2", 2)
    from conftest import MLP

    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "t2")
    torch.testing.assert_close(fresh(xi), want, rtol=1e-4, atol=1e-4)


def test_make_multitask_tags_examples():
    from lorakit.multitask import make_multitask

    rows = make_multitask({"a": [{"x": 1}, {"x": 2}], "b": [{"x": 3}]})
    assert [r["task_ids"] for r in rows] == [0, 0, 1]


def test_task_ids_out_of_range_are_a_clear_error():
    import pytest

    from lorakit.errors import ConfigError

    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lorakit.attach(m, {"method": "mtlora", "targets": ["0"], "r": 2, "r_task": 2, "n_tasks": 3})
    with lorakit.batch_context(m, task_ids=torch.tensor([0, 2])):
        m(torch.randn(2, 8))
    with pytest.raises(ConfigError, match=r"task_ids must lie in \[0, 3\).*got values \[0, 3\]"):
        with lorakit.batch_context(m, task_ids=torch.tensor([0, 3])):
            m(torch.randn(2, 8))
