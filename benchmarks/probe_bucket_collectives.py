"""Time one bucket's collectives on gloo, as zeroopt runs them in each mode.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/probe_bucket_collectives.py [--numel 4194304] [--reps 10]

Modes (ZEROOPT_BUCKET_COLLECTIVES): ``ring`` (gloo's default: comm/ring.py over isend/irecv),
``all_reduce`` (all_reduce + list all_gather) and ``native`` (reduce_scatter_tensor +
all_gather_into_tensor). Rank 0 prints ms per reduce and per gather; the figures behind the
choice in docs/BENCHMARKS.md ("Measurements behind zeroopt's choices").
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zeroopt.comm.torch_dist import TorchDistributed  # noqa: E402


def timed(fn, bucket, reps: int) -> float:
    fn(bucket).wait()  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn(bucket).wait()
    dist.barrier()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=4 << 20)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    bucket = torch.randn(args.numel // world * world)
    for mode in ("ring", "all_reduce", "native", "ring"):  # ring twice: the spread
        os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = mode
        comm = TorchDistributed(None)
        reduce_ms = timed(comm.reduce_bucket, bucket, args.reps)
        gather_ms = timed(comm.gather_bucket, bucket, args.reps)
        if dist.get_rank() == 0:
            print(f"W={world} {mode:10s} reduce {reduce_ms:6.1f} ms  gather {gather_ms:6.1f} ms "
                  f"({bucket.numel():,} fp32 elements)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
