"""An Accelerate training script with zeroopt's sharded optimizer (docs/ACCELERATE.md).

A small GPT (examples/gpt_model.py, tied embedding and head) learns the Python standard
library's bytes. Everything is Accelerate's usual loop; zeroopt changes two lines: the
optimizer is a ZeroOptimizer, and ``zeroopt.accelerate.prepare`` stands for
``accelerator.prepare``::

    accelerate launch --multi_gpu --num_processes 8 examples/accelerate_train.py \\
        --mixed_precision bf16                                      # 8 GPUs
    accelerate launch --cpu --num_processes 2 --mpirun_hostfile hosts examples/accelerate_train.py
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_train.py
    python examples/accelerate_train.py --steps 20                  # one process, e.g. a notebook

On CPU, ``accelerate launch`` starts several processes only through mpirun (a hostfile such as
``localhost slots=2``); without ``--mpirun_hostfile`` it starts one. torchrun works too, with
``ACCELERATE_USE_CPU=1`` (or ``Accelerator(cpu=True)``): without it Accelerate on a CPU-only
machine sees one process, which ``zeroopt.accelerate.prepare`` refuses (each rank would read
the whole dataset).

``--stop_at N --save DIR`` stops after step N of the ``--steps`` run and saves the training
state (accelerator.save_state); ``--resume DIR`` loads it (weights, optimizer state, scheduler,
step count, RNG) and trains on from there, on the batches the run that never stopped reads: it
ends with the same params digest.
"""
import argparse
import math
import pathlib
import sys
import time

import torch
from accelerate import Accelerator

import zeroopt
import zeroopt.accelerate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from data import load_stdlib_bytes  # noqa: E402
from gpt_model import GPT, GPTConfig  # noqa: E402


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps in all")
    p.add_argument("--optimizer", default="adamw", help="any zeroopt.available_optimizers() name")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per rank per micro-step")
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--data_bytes", type=int, default=2_000_000, help="one epoch of data")
    p.add_argument("--stop_at", type=int, default=0, help="stop after this step (0: --steps)")
    p.add_argument("--save", default="", help="accelerator.save_state here at the end")
    p.add_argument("--resume", default="", help="accelerator.load_state from here first")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def windows(block_size: int, data_bytes: int) -> torch.utils.data.TensorDataset:
    """Consecutive (x, y) byte windows of the stdlib's source (y: x shifted by one)."""
    rows = load_stdlib_bytes(data_bytes).long().unfold(0, block_size + 1, block_size)
    return torch.utils.data.TensorDataset(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


def main(argv=None) -> None:
    args = arguments(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum,
                              mixed_precision=args.mixed_precision)  # first: it joins the job
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(block_size=args.block_size, n_layer=2, n_head=4, n_embd=64))
    model.to(accelerator.device)  # before the optimizer: the params become views of its buffers
    opt = zeroopt.ZeroOptimizer(model.param_groups(0.1), args.optimizer, stage=args.stage,
                                lr=args.lr)
    # Accelerate steps the scheduler once per process per optimizer step (split_batches=False)
    total = args.steps * accelerator.num_processes
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda n: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(n / total, 1.0))))
    data = windows(args.block_size, args.data_bytes)
    per_step = args.batch_size * args.grad_accum * accelerator.num_processes
    if args.steps * per_step > len(data):
        raise SystemExit(f"--steps {args.steps} needs {args.steps * per_step} windows; "
                         f"--data_bytes {args.data_bytes} has {len(data)}: raise --data_bytes")
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    model, opt, loader, sched = zeroopt.accelerate.prepare(accelerator, model, opt, loader, sched)

    done = 0
    if args.resume:
        accelerator.load_state(args.resume)
        done = sched.scheduler.last_epoch // accelerator.num_processes
        loader = accelerator.skip_first_batches(loader, done * args.grad_accum)
        accelerator.print(f"resumed from {args.resume} at step {done}")
    accelerator.print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                      f"{args.optimizer} stage {args.stage}: {zeroopt.__name__} keeps "
                      f"{opt.optimizer.state_bytes() / 2**20:.2f} MiB of state per rank")
    start, tokens, norm = time.perf_counter(), 0, float("nan")
    for x, y in loader:
        with accelerator.accumulate(model):
            _, loss = model(x, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the global norm of the averaged gradients
                norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad()
        tokens += x.numel()
        if accelerator.sync_gradients:
            done += 1
            if done % 10 == 0 or done == (args.stop_at or args.steps):
                loss = accelerator.reduce(loss.detach(), "mean").item()
                rate = tokens / (time.perf_counter() - start)  # this rank's; ranks keep in step
                accelerator.print(f"step {done:4d}  loss {loss:.4f}  grad norm {norm:.3f}  "
                                  f"lr {sched.get_last_lr()[0]:.2e}  "
                                  f"{rate * accelerator.num_processes:,.0f} tok/s "
                                  f"({rate:,.0f}/rank)")
            if done == (args.stop_at or args.steps):
                break
    if args.save:
        accelerator.save_state(args.save)
        accelerator.print(f"saved the training state in {args.save}")
    accelerator.print(f"params digest {digest(model)}")
    accelerator.end_training()


def digest(model) -> str:
    """A short fingerprint of the params, to compare runs (a resumed run with an unbroken one)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    return f"{flat.double().sum().item():.10e}/{flat.double().square().sum().item():.10e}"


if __name__ == "__main__":
    main()
