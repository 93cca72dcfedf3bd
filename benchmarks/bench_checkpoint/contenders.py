"""The contenders of bench_checkpoint.py: each builds one rank's side around `model`.

A side trains a step, saves and loads a checkpoint (collectives: every rank calls them), and
fingerprints its model + optimizer state so that a load can be checked against the save.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .measure import instrument_zeroopt_hashing, sums, torch_layout_fingerprint

LAYERS, WIDTH, BATCH, LR, TRAIN_STEPS = 24, 1024, 32, 1e-3, 2


class Side:
    def step(self): ...
    def save(self, path: str): ...
    def load(self, path: str): ...
    def fingerprint(self) -> dict | None:  # a collective; the dict on rank 0
        ...


class _OptimizerSide(Side):
    """A side whose step is forward through `self.net`, backward, `opt.step()`, `opt.zero_grad()`."""

    def __init__(self, model, net, opt, x, y):
        self.model, self.net, self.opt, self.x, self.y = model, net, opt, x, y
        self.steps = 0

    def step(self):
        loss = F.mse_loss(self.net(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1


class ZeroOptSide(_OptimizerSide):
    info = "zeroopt.save_checkpoint / load_checkpoint (torch.distributed.checkpoint)"

    def __init__(self, model, x, y, stage=1):
        import zeroopt

        instrument_zeroopt_hashing()
        self.zeroopt = zeroopt
        opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer="adamw", stage=stage, lr=LR)
        super().__init__(model, model, opt, x, y)  # no DDP: zeroopt averages the grads

    def save(self, path):
        self.zeroopt.save_checkpoint(path, self.model, self.opt, step=self.steps)

    def load(self, path):
        self.steps = self.zeroopt.load_checkpoint(path, self.model, self.opt)["step"]

    def fingerprint(self):
        sd = self.opt.state_dict()  # a collective; every rank gets the whole dict
        if dist.get_rank() != 0:
            return None
        return torch_layout_fingerprint(self.model, sd)


class TorchZeroSide(_OptimizerSide):
    info = ("DDP + ZeroRedundancyOptimizer(torch.optim.AdamW): consolidate_state_dict(to=0) + "
            "torch.save on rank 0; torch.load + load_state_dict on every rank")

    def __init__(self, model, x, y):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
        super().__init__(model, ddp, opt, x, y)

    def save(self, path):
        self.opt.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                        "step": self.steps}, os.path.join(path, "checkpoint.pt"))

    def load(self, path):
        sd = torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu")
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.steps = sd["step"]

    def fingerprint(self):
        self.opt.consolidate_state_dict(to=0)
        if dist.get_rank() != 0:
            return None
        return torch_layout_fingerprint(self.model, self.opt.state_dict())


class DeepSpeedSide(Side):
    TAG = "ckpt"

    def __init__(self, model, x, y, stage=1, universal=False):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        if universal:
            config["checkpoint"] = {"load_universal": True}
        self.model, self.x, self.y = model, x, y
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR), config=config)
        self.info = (f"DeepSpeed {deepspeed.__version__} ZeRO-{stage}, engine.save_checkpoint / "
                     "load_checkpoint, torch.optim.AdamW as client optimizer")

    def step(self):
        loss = F.mse_loss(self.engine(self.x), self.y)
        self.engine.backward(loss)
        self.engine.step()

    def save(self, path):
        self.engine.save_checkpoint(path, tag=self.TAG)

    def load(self, path, tag=None):
        load_path, _ = self.engine.load_checkpoint(path, tag=tag or self.TAG)
        if load_path is None:
            raise RuntimeError(f"engine.load_checkpoint({path!r}) returned None (nothing loaded)")

    def fingerprint(self):
        from deepspeed.utils import safe_get_full_optimizer_state

        # A load replaces the inner optimizer's state tensors; DeepSpeed links the params'
        # views of them again only at the next step(). Link them now to read the loaded state.
        zero_opt = self.engine.optimizer
        if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
            zero_opt._hp_optimizer_states_linked = False
            zero_opt._lazy_init_hp_params_optimizer_state()
        fp = {f"param.{n}": sums(p) for n, p in self.model.named_parameters()}
        for n, p in self.model.named_parameters():  # each call is a collective over the dp group
            for key in ("exp_avg", "exp_avg_sq"):
                t = safe_get_full_optimizer_state(p, key)
                fp[f"{key}.{n}"] = sums(t) if t is not None else [float("nan")] * 2
        inner = self.engine.optimizer.optimizer
        steps = {float(st["step"]) for st in inner.state.values() if "step" in st}
        fp["step"] = [max(steps) if steps else -1.0]
        return fp if dist.get_rank() == 0 else None


def ds_universal_convert(ckpt_dir: str, tag: str) -> str:
    """deepspeed.checkpoint.ds_to_universal, in-process (its worker pools are its own)."""
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(ckpt_dir, tag + "_universal")
    args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=out,
                              num_extract_workers=2, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    return out


CONTENDERS = {
    "zeroopt1": ("zeroopt stage 1", lambda m, x, y, **kw: ZeroOptSide(m, x, y, stage=1)),
    "ds1": ("DeepSpeed ZeRO-1", lambda m, x, y, **kw: DeepSpeedSide(m, x, y, stage=1, **kw)),
    "ds2": ("DeepSpeed ZeRO-2", lambda m, x, y, **kw: DeepSpeedSide(m, x, y, stage=2, **kw)),
    "torch_zero": ("torch ZeroRedundancyOptimizer", lambda m, x, y, **kw: TorchZeroSide(m, x, y)),
}
BASE = "zeroopt1"
