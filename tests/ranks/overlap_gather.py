"""Overlapped param gathers against blocking ones, on every rank: the same training loop,
with every interleaving that touches the params between a step and the next forward, run
with ``overlap_param_gather=False`` and then ``True``; everything either run observes is
compared bit for bit (test_overlap_gather.py)."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

import zeroopt
from training import EXACT, batch, models, world

KINDS = {  # name -> (optimizer, model dtype)
    "adamw": ("adamw", torch.float32),
    "adamw_8bit": ("adamw_8bit", torch.float32),
    "paged_adamw_32bit": ("paged_adamw_32bit", torch.float32),
    "schedule_free_adamw": ("schedule_free_adamw", torch.float32),
    "adamw_bf16_params": ("adamw", torch.bfloat16),
}


def _loss(model, step: int, rank: int):
    x, y = batch(step, rank)
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def trajectory(kind: str, stage: int, overlap: bool, directory: str) -> tuple[list, int]:
    """What the training loop below observes, how many buckets a forward (or another torch
    call) waited for, and whether the first step's gathers were still in flight after
    ``zero_grad()`` (which sets every ``p.grad`` and must not wait for them)."""
    rank, _ = world()
    optimizer, dtype = KINDS[kind]
    model, _ = models(dtype)
    opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer, stage=stage, lr=1e-2,
                                overlap_param_gather=overlap, **EXACT)
    seen: list[torch.Tensor] = []

    def train(step: int) -> None:
        _loss(model, step, rank).backward()
        if step % 2:
            seen.append(opt.clip_grad_norm_(1.0))
        opt.step()
        opt.zero_grad()

    snapshot = None
    pending_after_zero_grad = []
    for step in range(9):
        train(step)
        pending_after_zero_grad.append(opt.param_gather.pending)
        if step == 0:  # a user's loop over model.parameters()
            seen += [p.detach().clone() for p in model.parameters()]
        elif step == 1:  # the model's state dict, kept for later
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
            seen += list(snapshot.values())
        elif step == 2:  # the optimizer's state dict
            state = opt.state_dict()["state"]
            seen += [v for per_param in state.values() for v in per_param.values()
                     if isinstance(v, torch.Tensor)]
        elif step == 3:  # weights loaded into the model: the next step starts from them
            model.load_state_dict(snapshot)
            if opt.rule.name != "schedule_free_adamw":
                opt.refresh_masters()
        elif step == 4:  # a second step with no forward: gradients set by hand
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.01 * (rank + 1))
            opt.step()
            opt.zero_grad()
        elif step == 5:  # evaluation mode (schedule-free moves the params) and back
            opt.eval()
            seen += [p.detach().clone() for p in model.parameters()]
            opt.train()
        elif step == 6:  # a checkpoint, loaded into a new model and optimizer
            path = os.path.join(directory, f"ckpt-{kind}-{stage}-{overlap}")
            zeroopt.save_checkpoint(path, model, opt)
            fresh, _ = models(dtype)
            fresh_opt = zeroopt.ZeroOptimizer(fresh.parameters(), optimizer, stage=stage,
                                              lr=1e-2, overlap_param_gather=overlap, **EXACT)
            zeroopt.load_checkpoint(path, fresh, fresh_opt)
            seen += [p.detach().clone() for p in fresh.parameters()]
            model, opt = fresh, fresh_opt  # the newer optimizer takes over, as torch.optim
        elif step == 7:  # a forward through part of the model only, then a step with no grads
            with torch.no_grad():
                seen.append(model.inp(batch(step, rank)[0].to(dtype)))
            opt.step()
    seen.append(_loss(model, 99, rank).detach())  # the next forward sees the stepped params
    opt.finish_param_gather()
    seen += [p.detach().clone() for p in model.parameters()]
    return seen, opt.param_gather.waits_in_forward, pending_after_zero_grad[0]


class Experts(nn.Module):
    """A trunk and three experts; each rank's forward runs its own expert only (a mixture of
    experts' routing), so the ranks touch different buckets after the trunk."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(37, 41)
        self.experts = nn.ModuleList(nn.Linear(41, 5) for _ in range(3))

    def forward(self, x, expert: int):
        return self.experts[expert](torch.tanh(self.trunk(x)))


def default_overlap(collectives: str) -> bool:
    """Whether a ZeroOptimizer built with the default ``overlap_param_gather`` overlaps."""
    previous = os.environ.get("ZEROOPT_BUCKET_COLLECTIVES")
    os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = collectives
    try:
        model, _ = models()
        return zeroopt.ZeroOptimizer(model.parameters(), "adamw").param_gather.overlap
    finally:
        if previous is None:
            del os.environ["ZEROOPT_BUCKET_COLLECTIVES"]
        else:
            os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = previous


def routed(overlap: bool, collectives: str) -> list[torch.Tensor]:
    """Each rank trains through its own expert (bucket collectives ``collectives``); the
    params after every step."""
    rank, world_size = world()
    previous = os.environ.get("ZEROOPT_BUCKET_COLLECTIVES")
    os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = collectives
    try:
        torch.manual_seed(7)
        model = Experts()
        opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", lr=1e-2,
                                    overlap_param_gather=overlap, bucket_numel=300)
    finally:
        if previous is None:
            del os.environ["ZEROOPT_BUCKET_COLLECTIVES"]
        else:
            os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = previous
    seen = []
    for step in range(4):
        x, y = batch(step, rank)
        nn.functional.mse_loss(model(x, (rank + step) % 3), y).backward()
        opt.step()
        opt.zero_grad()
        seen.append(model.experts[(rank + step + 1) % 3](torch.ones(1, 41)).detach())
    opt.finish_param_gather()
    return seen + [p.detach().clone() for p in model.parameters()]


def suite() -> dict:
    """Per (kind, stage): whether the overlapped run observed exactly what the blocking run
    did, how many waits happened in forward, and whether the guard left torch's mode stack."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = _shared_directory(tmp)
        for kind in KINDS:
            for stage in (1, 2):
                blocking, _, _ = trajectory(kind, stage, False, directory)
                overlapped, waits, in_flight = trajectory(kind, stage, True, directory)
                out[kind, stage] = dict(
                    equal=len(blocking) == len(overlapped) and all(
                        torch.equal(a, b) for a, b in zip(blocking, overlapped)),
                    first_difference=next((i for i, (a, b) in enumerate(zip(blocking, overlapped))
                                           if not torch.equal(a, b)), None),
                    waits_in_forward=waits,
                    in_flight_after_zero_grad=in_flight,
                    modes_left=torch._C._len_torch_function_stack())
    for collectives in ("auto", "ring"):
        blocking, overlapped = routed(False, collectives), routed(True, collectives)
        out["routed", collectives] = all(torch.equal(a, b) for a, b in zip(blocking, overlapped))
        out["default", collectives] = default_overlap(collectives)
    return out


def _shared_directory(tmp: str) -> str:
    """One checkpoint directory for every rank (rank 0's temp dir)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return tmp
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, tmp)
    return names[0]
