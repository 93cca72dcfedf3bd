"""``ZeroOptimizer.memory()``: a rank's optimizer memory by part, adding up to
``state_bytes()`` and ``device_state_bytes()`` (W = 1; the parts are per rank and no
collective is involved)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zeroopt

WINDOW = 1024
PARAMS = 64 * 96 + 96 + 96 * 80 + 80  # 13,936 elements


def built(dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 80)).to(dtype)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", window_numel=WINDOW,
                                min_8bit_size=0, **options)
    model(torch.randn(4, 64, dtype=dtype)).float().pow(2).mean().backward()
    opt.step()
    return opt


def codes(numel: int) -> int:
    """One 8-bit state of ``numel`` elements: a byte each and an fp32 absmax per block of 256
    (rounded up to whole blocks, as the flat buffer pads)."""
    blocks = -(-numel // 256)
    return blocks * 256 + blocks * 4


@pytest.mark.parametrize("case", ["fp32", "8bit", "paged_8bit", "bf16_model"])
def test_parts_add_up_to_the_two_totals(case):
    options = {"fp32": {}, "8bit": dict(state_precision="8bit"),
               "paged_8bit": dict(state_precision="8bit", paged=True),
               "bf16_model": {}}[case]
    opt = built(torch.bfloat16 if case == "bf16_model" else torch.float32, **options)
    parts = opt.memory()
    assert opt.state_bytes() == parts.states + parts.paged_states + parts.masters
    assert opt.device_state_bytes() == parts.states + parts.masters + parts.scratch
    padded = sum(region.numel for region in opt.shard.regions)
    if case in ("fp32", "bf16_model"):  # two fp32 moments, resident: no window needed
        assert (parts.states, parts.paged_states, parts.scratch) == (2 * 4 * padded, 0, 0)
        assert parts.masters == (4 * padded if case == "bf16_model" else 0)
    else:
        stored = 2 * codes(padded)
        on_device, paged = (0, stored) if case == "paged_8bit" else (stored, 0)
        assert (parts.states, parts.paged_states) == (on_device, paged)
        assert parts.scratch == 2 * 4 * WINDOW  # each moment's fp32 decode window
        assert opt.device_state_bytes() > opt.state_bytes() or case == "paged_8bit"
    assert padded >= PARAMS


def test_a_dropped_optimizer_is_freed_and_its_hooks_removed():
    """Nothing the library keeps (its hooks' finalizer, the layout) holds a ZeroOptimizer
    alive: once the user drops it, its states and buffers are freed (over shared memory,
    ~params/W bytes of /dev/shm each: a loop that rebuilds optimizers ran out of memory), and
    the model's params take their gradients as plain tensors again."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 80))
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw")
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    dropped, grads = weakref.ref(opt), weakref.ref(opt.grads)
    del opt
    gc.collect()
    assert dropped() is None and grads() is None
    model(torch.randn(4, 64)).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook took them
