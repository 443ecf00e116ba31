"""A launched training process that runs FSDP on the CPU: the test suite's stand-in for a GPU node.

accelerate 1.15 turns FSDP on only when its processes run on accelerators (state.py enables it inside
the MULTI_GPU/XPU/... branch); on the CPU it silently runs DDP. torch's FSDP2 itself runs on gloo, so
this worker lets accelerate start as it would (FSDP_* variables from configs/accelerate/fsdp.yaml)
and then switches its state to FSDP before train() prepares the model: the same sharding,
no_sync, clipping, full-state-dict gather and main-process save as on GPUs.

Usage (what tests/test_distributed.py runs): ACCELERATE_USE_CPU=1 accelerate launch --config_file
configs/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no tests/fsdp_cpu_worker.py job.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

import knowstack.train.loop as loop
from knowstack.train.launch import TrainJob, run_job


def fsdp_accelerator() -> Accelerator:
    accelerator = Accelerator()
    # Both shared states: AcceleratorState re-reads PartialState's whenever it is instantiated again.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables
    prepare = accelerator.prepare

    def prepare_and_report(model, *rest):
        prepared = prepare(model, *rest)
        # FSDP2 holds each parameter as a DTensor of which this process keeps one shard
        sharded = all(isinstance(p, DTensor) for p in prepared[0].parameters())
        print(f"rank {accelerator.process_index}: FSDP2 sharded parameters: {sharded}", flush=True)
        return prepared

    accelerator.prepare = prepare_and_report
    return accelerator


if __name__ == "__main__":
    loop.Accelerator = fsdp_accelerator
    run_job(TrainJob.load(Path(sys.argv[1])))
    assert loop.Accelerator is fsdp_accelerator and PartialState().distributed_type == DistributedType.FSDP
