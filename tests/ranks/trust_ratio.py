"""Trust-ratio scenarios on every rank: per-tensor (zeroopt) against chunk-wise (DeepSpeed)."""

from __future__ import annotations

import torch

import zeroopt
from training import EXACT, max_rel_err, models, train_side_by_side, world


class ChunkwiseReference:
    """The rule's reference step applied to each rank's chunk of each param as if the chunk
    were a tensor of its own: what an optimizer stepping flat ZeRO partitions computes."""

    def __init__(self, model, rule_name: str, hp: dict, chunks: dict):
        self.rule = zeroopt.algorithms.get_rule(rule_name)
        self.group = {**self.rule.defaults, **hp}
        self.params = list(model.parameters())
        self.chunks = chunks  # param index -> [(lo, hi), ...] over all ranks
        self.states = {}
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for i, p in enumerate(self.params):
            for lo, hi in self.chunks[i]:
                state = self.states.setdefault((i, lo), {
                    name: torch.zeros(hi - lo) for name in self.rule.states(self.group)})
                self.rule.reference_step(self.group, p.view(-1)[lo:hi],
                                         p.grad.view(-1)[lo:hi], state, self.t)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def per_tensor_vs_chunkwise(rule_name: str, hp: dict, steps: int = 4) -> dict:
    rank, world_size = world()
    model, ref = models()
    _, chunked = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), rule_name, stage=2, **EXACT, **hp)
    chunks: dict[int, list] = {}
    for r in range(world_size):
        for piece in opt.layout.pieces_of(r):
            chunks.setdefault(piece.slot.index, []).append(
                (piece.param_offset, piece.param_offset + piece.numel))
    ref_opt = zeroopt.ReferenceOptimizer(ref.parameters(), rule_name, **hp)
    chunk_opt = ChunkwiseReference(chunked, rule_name, hp, chunks)
    train_side_by_side(model, opt, [(ref, ref_opt), (chunked, chunk_opt)], range(steps))
    return {"vs_per_tensor": max_rel_err(model, ref),
            "vs_chunkwise": max_rel_err(model, chunked),
            "straddling_params": sum(len(c) > 1 for c in chunks.values())}


def exclusion_by_name(rule_name: str, hp: dict) -> dict:
    """exclude_from_trust_ratio with named params, against the reference with the same names;
    and against the reference without exclusion, which must differ."""
    rank, world_size = world()
    model, ref = models()
    _, plain = models()
    patterns = ("bias", "norm", "scale")
    opt = zeroopt.ZeroOptimizer(model.named_parameters(), rule_name, stage=1, **EXACT,
                                exclude_from_trust_ratio=patterns, **hp)
    ref_opt = zeroopt.ReferenceOptimizer(ref.named_parameters(), rule_name,
                                         exclude_from_trust_ratio=patterns, **hp)
    plain_opt = zeroopt.ReferenceOptimizer(plain.parameters(), rule_name, **hp)
    train_side_by_side(model, opt, [(ref, ref_opt), (plain, plain_opt)], range(4))
    return {"vs_named_reference": max_rel_err(model, ref),
            "vs_no_exclusion": max_rel_err(model, plain)}
