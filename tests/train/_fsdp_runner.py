"""Run ``lorakit train`` several times in the processes one ``torchrun`` started (one start-up for several runs).

``python -m torch.distributed.run --nproc-per-node 2 tests/train/_fsdp_runner.py JOBS.json``: JOBS is a list of
``{"args": [lorakit CLI arguments], "copy": [src_checkpoint, dst_out_dir] (optional)}``. Each run joins and leaves
the launcher's process group itself (as ``lorakit train`` under torchrun does); ``copy`` is done by rank 0 before
the run (every rank reads it only after the run's first barrier).
"""
import json
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    from lorakit.cli import main as cli

    rank = int(os.environ["RANK"])
    for job in jobs:
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
