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


def _official_linear(base, x, sA, sB, tA, tB, mode, s_sh=4.0, s_t=4.0):
    """scale-lab/MTLoRA models/lora.py MTLoRALinear.forward, one task: (shared output, task-path output)."""
    pretrained = base(x)
    lora = 0.0 if sA is None else (x @ sA.transpose(0, 1) @ sB.transpose(0, 1)) * s_sh  # None: feeds the trunk only
    if tA is None:
        return pretrained + lora, None
    task = x @ tA.transpose(0, 1) @ tB.transpose(0, 1) * s_t
    return pretrained + lora, pretrained + task if mode == "matrix" else pretrained + lora + task


import pytest  # noqa: E402


@pytest.mark.parametrize("mode", ["matrix", "matrixv2"])
def test_task_targets_and_modes_match_the_official_layer(mode, tmp_path):
    from conftest import MLP

    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "mtlora", "targets": ["lin0", "lin1"], "task_targets": ["lin1"], "r": 4,
                       "r_task": 2, "n_tasks": 3, "mode": mode, "dropout": 0.0, "seed": 0})
    fill(m)
    ads = dict(lorakit.adapters(m))
    assert ads["lin0"].task_A is None and ads["lin1"].task_A is not None  # task LoRAs only where asked
    # matrix: a task module's shared LoRA only feeds the official shared trunk, which one task path never runs
    assert (ads["lin1"].lora_A is None) == (mode == "matrix")
    assert ads["lin0"].s_sh == 4.0 and ads["lin1"].s_t == 4.0  # the official fixed scales by default
    xi, t = x(), torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad(), lorakit.batch_context(m, task_ids=t):
        got = m(xi)
    with torch.no_grad():
        ref = []
        for b in range(6):
            a0, a1 = ads["lin0"], ads["lin1"]
            h, _ = _official_linear(m.lin0.base_layer, xi[b], a0.lora_A.weight, a0.lora_B.weight, None, None, mode)
            h = torch.relu(h)
            sh = (None, None) if mode == "matrix" else (a1.lora_A.weight, a1.lora_B.weight)
            _, h = _official_linear(m.lin1.base_layer, h, *sh, a1.task_A[t[b]],
                                    a1.task_B[t[b]], mode)  # the sample's own task path at the task module
            ref.append(m.out(torch.relu(h)))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-5, atol=1e-5)
    # export: task 1 as a plain LoRA (ranks padded to one) computes the task-1 path
    export_task(m, tmp_path / "t1", 1)
    with torch.no_grad(), lorakit.batch_context(m, task_ids=torch.ones(6, dtype=torch.long)):
        want = m(xi)
    from conftest import MLP as _M
    torch.manual_seed(0)
    fresh = _M()
    lorakit.load_adapter(fresh, tmp_path / "t1")
    torch.testing.assert_close(fresh(xi), want, rtol=1e-4, atol=1e-4)


def test_bad_mode_and_task_targets_are_refused():
    from lorakit.errors import ConfigError
    from conftest import MLP

    with pytest.raises(ConfigError, match="mode='addition'; valid: matrix, matrixv2"):
        lorakit.attach(MLP(), {"method": "mtlora", "targets": ["lin0"], "mode": "addition"})
    with pytest.raises(ConfigError, match="matches none of the adapted modules"):
        lorakit.attach(MLP(), {"method": "mtlora", "targets": ["lin0"], "task_targets": ["nope"], "r": 4})  # r <= 12
