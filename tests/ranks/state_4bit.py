"""4-bit states (torchao's AdamW4bit format) sharded: what runs on every rank, and the
unsharded references the test process holds it to.

zeroopt trains sharded on each rank's batch (``against_torchao``). The references train
unsharded on the exact average of every rank's gradient (``training.reference_backward``, zeroopt
reducing in fp64), in the test process (``references``): torchao's ``AdamW4bit`` (the reference
package; imported once there, not on every rank: its import takes ~10 s), and torch.optim's
AdamW with 32-bit states, which shows how far 4-bit states move training at all.

torchao steps each param through ``torch.compile(single_param_adam)``; compiling it costs ~35 s
per param shape on these 2 cores, so it runs eagerly here (``torch.compile`` made the identity
while it steps). Eager and compiled differ by a few fp32 ulps (measured on a small MLP: at most
3.7e-8 on params of order 0.1 after 8 steps, no code flipped).

The model (``FourBitModel``, 45,471 params) has two weights of whole 128- and 256-element
blocks and over 4096 elements (28,416 and 12,288: 4-bit in both), one over 4096 that is not
whole blocks (4,107: 32-bit in both), and small params (32-bit), laid out in small buckets so
that the 4-bit weights straddle shards at W = 2 and 3.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

import zeroopt
from training import EXACT, batch, loss_of, reference_backward, world

STEPS = 6
SAVED_AT, TOTAL = 3, 6  # checkpoints: saved after step 3, resumed for steps 4..6
TRANSFORMERS_HP = dict(lr=1e-2, weight_decay=0.1)  # betas (0.9, 0.999), eps 1e-8: the defaults
# Hyperparameters exact in fp32 (2^-7, 2^-3, betas whose powers are exact): torchao computes
# lr * weight_decay and 1 - beta^t in fp32, zeroopt (as torch.optim) in fp64; with these both
# are exact, and what is left between the two is the update's ulps.
DYADIC_HP = dict(lr=2.0**-7, weight_decay=0.125, betas=(0.5, 0.75))

# case -> (zeroopt name, hyperparameters, torchao block_size, stage)
CASES = {
    # Transformers' adamw_torch_4bit: blocks of 256, the default betas and eps
    "adamw_torch_4bit": ("adamw_torch_4bit", TRANSFORMERS_HP, 256, 2),
    # torchao's own default: blocks of 128 (state_precision="4bit" on any rule)
    "adamw_4bit_block128_dyadic": ("adamw", dict(DYADIC_HP, state_precision="4bit"), 128, 1),
}


class FourBitModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(37, 111)  # 4,107: over 4096, not whole blocks: 32-bit
        self.mid = nn.Linear(111, 256)  # 28,416 = 111 x 256: 4-bit
        self.mid2 = nn.Linear(256, 48)  # 12,288 = 48 x 256: 4-bit
        self.out = nn.Linear(48, 5)  # 240: 32-bit

    def forward(self, x):
        return self.out(torch.tanh(self.mid2(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


QUANTIZED = ("mid.weight", "mid2.weight")


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(1234)
    m = FourBitModel()
    if seed:  # a resumed model starts elsewhere: a load that missed a param would show
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    return m


@contextlib.contextmanager
def eager_torchao():
    """torchao's step run eagerly (see the module notes)."""
    compile_ = torch.compile
    torch.compile = lambda fn, **kwargs: fn
    try:
        yield
    finally:
        torch.compile = compile_


def params_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def against_torchao(case: str) -> dict:
    """zeroopt's 4-bit run, sharded on each rank's batch: its params, its states (decoded, by
    param name) and the precision and block each param's states got."""
    name, hp, _, stage = CASES[case]
    rank, _ = world()
    m = model()
    opt = zeroopt.ZeroOptimizer(m.parameters(), name, stage=stage, **EXACT, **hp)
    for step in range(STEPS):
        loss_of(m, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    names = [n for n, _ in m.named_parameters()]
    saved = opt.state_dict()["state"]
    return dict(params=params_of(m),
                states={(n, s): saved[i][s] for i, n in enumerate(names)
                        for s in ("exp_avg", "exp_avg_sq")},
                kinds={names[slot.index]: (opt.layout.buffers[slot.buffer].kind.precision,
                                           opt.layout.buffers[slot.buffer].kind.block)
                       for slot in opt.layout.slots})


def references(case: str, world_size: int) -> dict:
    """In the test process: torchao's AdamW4bit and torch.optim's AdamW, unsharded on the
    average of ``world_size`` ranks' gradients, for ``case``'s steps: their params, and
    torchao's states (dequantized) with whether it quantized them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the ranks (distributed.py): matmuls then round alike
    try:
        return _references(case, world_size)
    finally:
        torch.set_num_threads(threads)


def _references(case: str, world_size: int) -> dict:
    from torchao.optim import AdamW4bit

    _, hp, block, _ = CASES[case]
    hp = {k: v for k, v in hp.items() if k != "state_precision"}
    ta, ref32 = model(), model()
    opt_ta = AdamW4bit(ta.parameters(), block_size=block, **hp)
    opt32 = torch.optim.AdamW(ref32.parameters(), **hp)
    for step in range(STEPS):
        for m, opt in ((ta, opt_ta), (ref32, opt32)):
            reference_backward(m, step, world_size)
            with eager_torchao():  # (torch.optim's AdamW compiles nothing)
                opt.step()
            opt.zero_grad()
    states = {}
    for n, p in ta.named_parameters():
        for s in ("exp_avg", "exp_avg_sq"):
            value = opt_ta.state[p][s]
            quantized = type(value).__name__ == "OptimState4bit"
            states[n, s] = (value.dequantize() if quantized else value).detach().clone(), \
                quantized
    return dict(torchao=params_of(ta), adamw32=params_of(ref32), states=states)


def paged_windows_match(case: str = "adamw_torch_4bit") -> bool:
    """Paged 4-bit states, stepped through windows of 512 elements, train as resident ones do,
    bit for bit."""
    name, hp, _, stage = CASES[case]
    rank, _ = world()
    runs = []
    for options in (dict(), dict(paged=True, window_numel=512)):
        m = model()
        opt = zeroopt.ZeroOptimizer(m.parameters(), name, stage=stage, **EXACT, **hp, **options)
        for step in range(STEPS):
            loss_of(m, *batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
        runs.append(params_of(m))
    return all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


# --- checkpoints ------------------------------------------------------------------------------
# Every rank trains on the step's same batch, so the averaged gradient is the same at every world
# size (training.EXACT) and a resumed run must equal the uninterrupted one bit for bit.


def _build(precision: str = "4bit", seed: int = 0):
    m = model(seed)
    opt = zeroopt.ZeroOptimizer(m.parameters(), "adamw_torch_4bit", stage=2, **EXACT,
                                **TRANSFORMERS_HP, state_precision=precision)
    return m, opt


def _train(m, opt, steps) -> None:
    for t in steps:
        loss_of(m, *batch(t, 0)).backward()
        opt.step()
        opt.zero_grad()


def uninterrupted() -> dict[str, torch.Tensor]:
    """The run's final params: the same at every world size, bit for bit."""
    m, opt = _build()
    _train(m, opt, range(1, TOTAL + 1))
    return params_of(m)


def save_partway(root: str) -> dict:
    """After SAVED_AT steps: a DCP checkpoint, and a state dict (torch.save'd by rank 0)."""
    m, opt = _build()
    _train(m, opt, range(1, SAVED_AT + 1))
    zeroopt.save_checkpoint(os.path.join(root, "dcp"), m, opt, step=SAVED_AT)
    state = opt.state_dict()
    if world()[0] == 0:
        torch.save({"model": params_of(m), "optimizer": state}, os.path.join(root, "sd.pt"))
    return state


def resume(root: str) -> dict:
    """From the checkpoint: 4-bit through DCP; 4-bit through the state dict; 4-bit -> 32-bit ->
    4-bit through state dicts (each finishing the run in 4-bit); and 4-bit into 32-bit and
    8-bit states (loaded values and a step)."""
    out = {}
    m, opt = _build(seed=99)
    assert zeroopt.load_checkpoint(os.path.join(root, "dcp"), m, opt) == {"step": SAVED_AT}
    _train(m, opt, range(SAVED_AT + 1, TOTAL + 1))
    out["dcp"] = params_of(m)

    saved = torch.load(os.path.join(root, "sd.pt"), weights_only=False)

    def from_saved(precision: str, state: dict, seed: int = 99):
        m, opt = _build(precision, seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(saved["model"][n])
        opt.load_state_dict(copy.deepcopy(state))
        return m, opt

    m, opt = from_saved("4bit", saved["optimizer"])
    _train(m, opt, range(SAVED_AT + 1, TOTAL + 1))
    out["state_dict"] = params_of(m)

    _, opt32 = from_saved("32bit", saved["optimizer"])
    through_32 = opt32.state_dict()
    out["kinds_32"] = sorted({b.kind.precision for b in opt32.layout.buffers})
    out["state_32"] = through_32["state"]
    m, opt = from_saved("4bit", through_32)
    _train(m, opt, range(SAVED_AT + 1, TOTAL + 1))
    out["via_32bit"] = params_of(m)

    m, opt8 = from_saved("8bit", saved["optimizer"])
    out["state_8"] = {index: {name: _decoded_8bit(entry, name, name != "exp_avg")
                              for name in ("exp_avg", "exp_avg_sq")}
                      for index, entry in opt8.state_dict()["state"].items()}
    out["kinds_8"] = sorted({b.kind.precision for b in opt8.layout.buffers})
    _train(m, opt8, range(SAVED_AT + 1, SAVED_AT + 2))
    out["8bit_stepped"] = all(bool(torch.isfinite(p).all()) for p in m.parameters())
    return out


def _decoded_8bit(entry: dict, name: str, nonnegative: bool) -> torch.Tensor:
    """A saved state's values: 8-bit codes decoded (whole blocks of 256), else as they are."""
    from zeroopt.states import blockwise

    value = entry[name]
    if value.dtype != torch.uint8:
        return value
    codes = value.reshape(-1)
    codes = torch.cat([codes, codes.new_zeros(-codes.numel() % blockwise.BLOCK)])
    decoded = blockwise.dequantize(codes, entry[name + "_absmax"].float(), not nonnegative)
    return decoded[:value.numel()].view(value.shape)


def suite(root: str) -> dict:
    """Everything at this world size, in one set of processes: the runs held to torchao,
    paged windows, the same-batch run, and the checkpoints (W = 3 saves into ``root``, W = 2
    resumes from it)."""
    _, world_size = world()
    out = {case: against_torchao(case) for case in CASES}
    out["paged"] = paged_windows_match()
    out["uninterrupted"] = uninterrupted()
    if world_size == 3:
        out["saved"] = save_partway(root)
    if world_size == 2:
        out["resumed"] = resume(root)
    return out
