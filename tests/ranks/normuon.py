"""NorMuon scenarios, run on every rank (see test_normuon.py for the assertions).

zeroopt's "normuon" trains sharded on each rank's batch; pytorch_optimizer.NorMuon trains
unsharded on the exact average of every rank's gradient (summed in fp64 and rounded once, as
zeroopt reduces with ``EXACT``), so both see the same gradients bit for bit and any difference
is the update's. The model mixes NorMuon's two kinds of groups:

- Muon (``use_muon=True``, each stepped whole on its owner): weights 13 x 12 (tall), 7 x 13
  (wide), 13 x 7 (tall) and a Conv1d weight 13 x 7 x 3 (taken as its 13 x 21 matrix);
- AdamW (``use_muon=False``, element-wise over the flat shard): two input layers (37 -> 6
  each, as embeddings would be) and the output head (5 x 13), every bias, a LayerNorm's
  weight and bias, and a 0-d scale. Buckets of 300 elements, in the order ``ADAMW_LAYOUT``,
  put a bias (up.bias) and the LayerNorm's weight across the ranks' chunk boundary (256
  elements in) at W = 2 and 3, besides whatever else the layout splits.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import zeroopt
import zeroopt.algorithms.normuon as normuon_module
from training import EXACT, batch, loss_of, world

STEPS = 6
OPTIONS = dict(EXACT, bucket_numel=300)  # fp64 reduction
# The AdamW params in the flat buffer's order (the layout packs a group's params in reverse):
# bucket 1 is 248 elements, then up.bias across 256; bucket 2 is 254, then norm.weight.
ADAMW_LAYOUT = ("embed.weight", "embed.bias", "mid.bias", "down.bias", "up.bias",
                "head.weight", "gate.weight", "gate.bias", "conv.bias", "head.bias", "scale",
                "norm.bias", "norm.weight")
# case -> (hyperparameters for both, extra keys of the Muon group, of the AdamW group,
#          zeroopt's own options, whether the conv branch sits out the odd steps)
CASES = {
    # AdamW groups with no keys of their own: they take adamw_lr, adamw_wd... (group_defaults);
    # the conv branch gets no gradient at odd steps (steps are counted per group)
    "defaults": (dict(weight_decay=0.1, adamw_lr=3e-3, adamw_wd=0.05), {}, {}, {}, True),
    # the groups' own values; Moonlight's lr; a coefficient schedule; plain momentum
    "adjusted": (dict(lr=0.03, momentum=0.9, beta2=0.9, nesterov=False, use_adjusted_lr=True,
                      ns_coeffs="polar_express", ns_steps=6, weight_decay=0.05),
                 dict(lr=0.02), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.02),
                 {}, False),
    # match_rms scaling, L2 decay into the gradient, maximize, a two-entry schedule
    "match_rms": (dict(update_scale="match_rms", weight_decay=0.1, weight_decouple=False,
                       maximize=True, adamw_lr=2e-3, adamw_wd=0.1, eps=1e-8,
                       ns_coeffs=[(3.4445, -4.7750, 2.0315), (3.0, -3.2, 1.2)]),
                  {}, {}, {}, False),
    # zeroopt's layerwise: each matrix stepped during backward, the same update
    "layerwise": (dict(weight_decay=0.1, adamw_lr=3e-3), {}, {}, dict(layerwise=True), False),
}

# Stages 1 and 2 differ in how gradients arrive, not in the rule: the variants run at stage 2.
STAGES = {"adjusted": (2,), "match_rms": (2,)}


class HybridModel(nn.Module):
    """Muon matrices of odd sizes between an AdamW input layer and an AdamW head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(37, 6)
        self.gate = nn.Linear(37, 6)
        self.mid = nn.Linear(12, 13)
        self.down = nn.Linear(13, 7)
        self.norm = nn.LayerNorm(7)
        self.up = nn.Linear(7, 13)
        self.conv = nn.Conv1d(7, 13, kernel_size=3, padding=1)
        self.head = nn.Linear(13, 5)
        self.scale = nn.Parameter(torch.tensor(0.75))
        self.skip_conv = False

    def forward(self, x):
        e = torch.tanh(torch.cat([self.embed(x), self.gate(x)], -1))
        h = self.norm(torch.tanh(self.down(torch.tanh(self.mid(e)))))
        out = torch.tanh(self.up(h))
        if not self.skip_conv:
            out = out + torch.tanh(self.conv(torch.stack([h, h.flip(-1)], -1))).mean(-1)
        return self.head(out) * self.scale


def is_muon(name: str, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and not name.startswith(("embed", "gate", "head"))


def groups(model: nn.Module, muon_keys: dict, adamw_keys: dict) -> list[dict]:
    named = dict(model.named_parameters())
    assert sorted(ADAMW_LAYOUT) == sorted(n for n, p in named.items() if not is_muon(n, p))
    return [dict(params=[p for n, p in named.items() if is_muon(n, p)], use_muon=True,
                 **muon_keys),
            dict(params=[named[n] for n in reversed(ADAMW_LAYOUT)], use_muon=False,
                 **adamw_keys)]


def build(seed: int = 1234) -> HybridModel:
    torch.manual_seed(seed)
    return HybridModel()


MATRICES = sum(is_muon(n, p) for n, p in HybridModel().named_parameters())


def average_backward(model: nn.Module, step: int, world_size: int, rank_batch=batch) -> None:
    """``model``'s grads: the average over ranks of their gradients, summed in fp64 and
    rounded once to fp32 (zeroopt's EXACT reduction). A param no rank's loss reaches gets no
    gradient (None), as on zeroopt's side, where it does not step."""
    total: dict = {}
    for r in range(world_size):
        model.zero_grad(set_to_none=True)
        loss_of(model, *rank_batch(step, r)).backward()
        for p in model.parameters():
            if p.grad is not None:
                total[p] = total.get(p, 0) + p.grad.double()
    for p in model.parameters():
        p.grad = (total[p] * (1.0 / world_size)).float() if p in total else None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max()
    return ((a - b).abs().max() / scale).item() if scale > 0 else (a - b).abs().max().item()


def against_normuon(case: str, stage: int, perturb: dict | None = None) -> dict:
    """After STEPS steps: the largest relative param and state errors against
    pytorch_optimizer.NorMuon (and the params' against zeroopt's eager ReferenceOptimizer),
    the params straddling ranks, the matrices this rank owns and the shapes it orthogonalized
    at each step. ``perturb``: hyperparameters given to zeroopt's side only (the tests check
    that a wrong one shows)."""
    from pytorch_optimizer import NorMuon

    rank, world_size = world()
    hp, muon_keys, adamw_keys, ours, skip = CASES[case]
    model, ref, eager = build(), build(), build()
    opt = zeroopt.ZeroOptimizer(groups(model, muon_keys, adamw_keys), "normuon", stage=stage,
                                **OPTIONS, **{**hp, **(perturb or {})}, **ours)
    ref_opt = NorMuon(groups(ref, muon_keys, adamw_keys), **hp)
    eager_opt = zeroopt.ReferenceOptimizer(groups(eager, muon_keys, adamw_keys), "normuon", **hp)

    calls: list[tuple[int, tuple]] = []
    current = [0, False]  # the step, and whether zeroopt (not the eager reference) is stepping
    original = normuon_module.newton_schulz

    def counted(matrix, *args, **kwargs):
        if current[1]:
            calls.append((current[0], tuple(matrix.shape)))
        return original(matrix, *args, **kwargs)

    normuon_module.newton_schulz = counted
    try:
        for step in range(STEPS):
            current[0] = step
            model.skip_conv = ref.skip_conv = eager.skip_conv = skip and step % 2 == 1
            current[1] = True  # layerwise: the matrices are stepped during backward
            loss_of(model, *batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
            current[1] = False
            for m, o in ((ref, ref_opt), (eager, eager_opt)):
                average_backward(m, step, world_size)
                o.step()
                o.zero_grad()
    finally:
        normuon_module.newton_schulz = original

    state = opt.state_dict()["state"]  # gathered: every param's states, in its shape
    ref_params = [p for g in ref_opt.param_groups for p in g["params"]]
    state_err = {}
    for index, p in enumerate(ref_params):
        for name, theirs in ref_opt.state[p].items():
            ours_state = state[index][name]
            assert ours_state.shape == theirs.shape, (name, ours_state.shape, theirs.shape)
            state_err[name] = max(state_err.get(name, 0.0), _rel(ours_state, theirs))
    owners: dict[int, set] = {}
    for r in range(world_size):
        for piece in opt.layout.pieces_of(r):
            owners.setdefault(piece.slot.index, set()).add(r)
    ours_params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    return dict(
        err=max(_rel(a.detach(), b.detach()) for a, b in zip(ours_params, ref_params)),
        eager_err=max(_rel(a.detach(), b.detach()) for a, b in zip(
            ours_params, [p for g in eager_opt.param_groups for p in g["params"]])),
        state_err=state_err,
        moved=max(_rel(a.detach(), b.detach()) for a, b in zip(model.parameters(),
                                                              build().parameters())),
        straddling=sorted(names[id(ours_params[i])] for i, ranks in owners.items()
                          if len(ranks) > 1),
        owned=sorted(tuple(o.param.shape) for g in opt.shard.whole.owned for o in g),
        calls=calls,
        group_steps=[(g["step"], r["step"]) for g, r in zip(opt.param_groups,
                                                          ref_opt.param_groups)])


# -- a checkpoint saved at W=3, resumed at W=2 ---------------------------------------------

SAVED_AT, TOTAL = 3, 6
RESHARDED_HP = dict(weight_decay=0.1, adamw_lr=3e-3, adamw_wd=0.05)


def _same_batch(step: int, rank: int):
    return batch(step, 0)  # every rank the same batch: the average is that batch's gradient


def _build_for_checkpoint(seed: int = 1234):
    model = build(seed)
    return model, zeroopt.ZeroOptimizer(groups(model, {}, {}), "normuon", stage=2, **OPTIONS,
                                        **RESHARDED_HP)


def _train_same_batch(model, opt, steps) -> None:
    for t in steps:
        loss_of(model, *_same_batch(t, 0)).backward()
        opt.step()
        opt.zero_grad()


def save_partway(root: str) -> list[torch.Tensor]:
    """The uninterrupted run's final params; a checkpoint SAVED_AT steps in."""
    model, opt = _build_for_checkpoint()
    _train_same_batch(model, opt, range(TOTAL))
    finals = [p.detach().clone() for p in model.parameters()]
    model, opt = _build_for_checkpoint()
    _train_same_batch(model, opt, range(SAVED_AT))
    zeroopt.save_checkpoint(os.path.join(root, "normuon"), model, opt, step=SAVED_AT)
    return finals


def resume(root: str) -> dict:
    """Another model and optimizer (other initial params: a load that missed one would
    show), loaded and trained to TOTAL; its final params and group step counts."""
    model, opt = _build_for_checkpoint(seed=99)
    assert zeroopt.load_checkpoint(os.path.join(root, "normuon"), model, opt) == \
        {"step": SAVED_AT}
    steps_at_load = [g["step"] for g in opt.param_groups]
    _train_same_batch(model, opt, range(SAVED_AT, TOTAL))
    return dict(params=[p.detach().clone() for p in model.parameters()],
                steps_at_load=steps_at_load)


def suite(root: str | None = None, save: bool = False, load: bool = False) -> dict:
    """Every case at stages 1 and 2 in one set of processes; the checkpoint's save or
    resume where asked."""
    out = {(case, stage): against_normuon(case, stage) for case in CASES
           for stage in STAGES.get(case, (1, 2))}
    if save:
        out["saved"] = save_partway(root)
    if load:
        out["resumed"] = resume(root)
    return out
