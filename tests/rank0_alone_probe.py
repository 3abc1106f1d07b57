"""Two ranks over gloo: rank 0 works alone for longer than the collective timeout (a long sample grid), then
both meet in a collective. Run under torchrun by tests/integration/test_rank0_alone.py:

    torchrun --standalone --nproc_per_node 2 tests/rank0_alone_probe.py --solo-s 14 [--unguarded]

With the Engine's rank0_alone the other rank waits at the host group's barrier (rank0_timeout_s) and
the collective after it succeeds; --unguarded waits in the collective itself, as the loop did before,
and the collective timeout (10 s) ends the job.
"""

import argparse
import time

import torch
import torch.distributed as dist

from orchestrator.train.ddp import DdpEngine

parser = argparse.ArgumentParser()
parser.add_argument("--solo-s", type=float, required=True)
parser.add_argument("--unguarded", action="store_true")
args = parser.parse_args()

engine = DdpEngine("cpu", "no", expected_world_size=2, collective_timeout_s=10, rank0_timeout_s=120)
began = time.perf_counter()
if args.unguarded:
    if engine.is_main:
        time.sleep(args.solo_s)
else:
    with engine.rank0_alone("a long sample grid"):
        if engine.is_main:
            time.sleep(args.solo_s)
total = torch.ones(1)
dist.all_reduce(total)  # the next step's gradient all-reduce, on the default group with its 10 s timeout
print(f"rank {engine.rank}: collective after {time.perf_counter() - began:.1f} s gave {total.item():.0f}", flush=True)
engine.close()
