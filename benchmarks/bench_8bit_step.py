"""Baseline for issue 4's fused 8-bit step: AdamW on 12.5M elements (one rank's shard of the
25M-param benchmark model), one thread, three ways:

- torch's fused 32-bit AdamW kernel (the anchor);
- bitsandbytes' AdamW8bit on CPU;
- zeroopt's blockwise format (states/blockwise.py) driven eagerly: dequantize a window,
  the fused 32-bit kernel, requantize, window by window.

    python benchmarks/bench_8bit_step.py

Prints the times and ratios (no file is written: this is a baseline to beat, not a result).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zeroopt.states import blockwise  # noqa: E402

N = blockwise.BLOCK * 48828  # ~12.5M
WINDOW = blockwise.BLOCK * 1024
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False,
          maximize=False)


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, g, step = torch.randn(N), torch.randn(N), torch.tensor(3.0)
    m, v = torch.zeros(N), torch.zeros(N)
    fused = timed(lambda: torch._fused_adamw_([x], [g], [m], [v], [], [step], **HP))

    mq, ma = blockwise.quantize(torch.randn(N) * 1e-3, signed=True)
    vq, va = blockwise.quantize(torch.rand(N) * 1e-6, signed=False)

    def windowed():
        for lo in range(0, N, WINDOW):
            hi = min(N, lo + WINDOW)
            blocks = slice(lo // blockwise.BLOCK, hi // blockwise.BLOCK)
            mw = blockwise.dequantize(mq[lo:hi], ma[blocks], signed=True)
            vw = blockwise.dequantize(vq[lo:hi], va[blocks], signed=False)
            torch._fused_adamw_([x[lo:hi]], [g[lo:hi]], [mw], [vw], [], [step], **HP)
            blockwise.quantize(mw, True, codes=mq[lo:hi], absmax=ma[blocks])
            blockwise.quantize(vw, False, codes=vq[lo:hi], absmax=va[blocks])

    ours = timed(windowed)
    rows = [("torch fused AdamW, 32-bit", fused)]
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(N))
        p.grad = torch.randn(N)
        opt = bnb.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=1)
        rows.append(("bitsandbytes AdamW8bit (CPU)", timed(opt.step)))
    except ImportError:
        print("bitsandbytes is not installed: its row is skipped")
    rows.append(("zeroopt blockwise, eager windowed", ours))
    print(f"AdamW step on {N / 1e6:.1f}M elements, 1 thread")
    for name, seconds in rows:
        print(f"  {name:<36} {seconds:7.3f} s   {seconds / fused:6.1f}x fused 32-bit")


if __name__ == "__main__":
    main()
