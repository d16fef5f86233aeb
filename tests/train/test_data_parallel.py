"""2-process gloo data parallel (torch.multiprocessing) == one process with the same global batch."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from .conftest import tiny_cfg


def _worker(rank, world, port, cfg, q):
    import torch.distributed as dist

    from lorakit.train import run_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = run_training(cfg)
        q.put((rank, r["loss_curve"]))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tiny_lm_dir, cls_data, tmp_path):
    """Tiny Llama (no dropout), one label token per row: the per-rank mean losses average to the global mean."""
    from lorakit.train import run_training

    single = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "one", steps=4)
    ref = run_training(single)
    dp = json.loads(json.dumps(single))
    dp["output"]["dir"] = str(tmp_path / "dp")
    dp["train"]["distributed"] = "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, dp, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert out[0] == out[1]  # the averaged loss is the same on both ranks
    assert torch.allclose(torch.tensor(out[0]), torch.tensor(ref["loss_curve"]), atol=1e-5)
    assert (tmp_path / "dp" / "adapter" / "adapter_model.safetensors").is_file()
    a = __import__("lorakit").io._read_tensors(tmp_path / "one" / "adapter")
    b = __import__("lorakit").io._read_tensors(tmp_path / "dp" / "adapter")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
