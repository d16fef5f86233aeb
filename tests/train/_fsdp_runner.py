"""Run ``lorakit train`` several times in the processes one ``torchrun`` started (one start-up for several runs).

``python -m torch.distributed.run --nproc-per-node 2 tests/train/_fsdp_runner.py JOBS.json``: JOBS is a list of
``{"args": [lorakit CLI arguments], "copy": [src_checkpoint, dst_out_dir] (optional), "port": free port}``. Each run joins and leaves
the launcher's process group itself (as ``lorakit train`` under torchrun does); ``copy`` is done by rank 0 before
the run (every rank reads it only after the run's first barrier).
"""
import json
import os
import shutil
import sys
from pathlib import Path


def check_gradients(path: str) -> None:
    """lorakit.train.distributed.average_gradients with parameters that have a gradient on some ranks only."""
    import torch
    import torch.distributed as dist

    from lorakit.train.distributed import average_gradients

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    p = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    p[0].grad = torch.full((3,), float(rank + 1))  # every rank: mean of 1..world
    if rank == 0:
        p[1].grad = torch.tensor([2.0, 4.0, 6.0])  # rank 0 only: the others count as zero
    average_gradients(p, world)  # p[2]: no rank has a gradient
    if rank == 0:
        Path(path).write_text(json.dumps({"g0": p[0].grad.tolist(), "g1": p[1].grad.tolist(),
                                          "g2": None if p[2].grad is None else p[2].grad.tolist(), "world": world}))
    dist.destroy_process_group()


def hf_trainer(job: dict) -> None:
    """A transformers Trainer run with AdapterCallback under torchrun (DDP through accelerate): AdaLoRA, so the
    controller needs the (averaged) gradients; each rank writes its final adapter tensors for the test to compare."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import lorakit
    from lorakit.integrations.hf import AdapterCallback

    class DS(torch.utils.data.Dataset):
        def __init__(self, n=32, vocab=40, seq=12):
            self.x = torch.randint(5, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = lorakit.attach(AutoModelForCausalLM.from_pretrained(job["model"]),
                           {"method": "adalora", "targets": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2,
                            "tinit": 0, "tfinal": 1, "deltaT": 1, "total_step": 4, "seed": 0})
    args = TrainingArguments(output_dir=job["hf"], max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=DS(), callbacks=[AdapterCallback()]).train()
    rank = int(os.environ["RANK"])
    save_file(lorakit.io.adapter_state(model), str(Path(job["hf"]) / f"rank{rank}.safetensors"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    from lorakit.cli import main as cli

    rank = int(os.environ["RANK"])
    for job in jobs:
        # a fresh rendezvous store per job: re-joining a process group over the launcher's one store would read the
        # previous group's stale addresses (one `lorakit train` per torchrun start, the normal use, joins once)
        os.environ.update(MASTER_PORT=str(job["port"]), TORCHELASTIC_USE_AGENT_STORE="False")
        if job.get("hf"):
            hf_trainer(job)
            continue
        if job.get("grads"):
            check_gradients(job["grads"])
            continue
        if rank == 0 and job.get("copy"):
            src, dst = Path(job["copy"][0]), Path(job["copy"][1]) / "checkpoints"
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst / src.name)
            (dst / "latest").write_text(src.name)
        rc = cli(job["args"])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
