"""Baseline for issue 4's fused 8-bit step: AdamW on 12.5M elements (one rank's shard of the
25M-param benchmark model), one thread, three ways:

- torch's fused 32-bit AdamW kernel (the anchor);
- bitsandbytes' AdamW8bit on CPU;
- zeroopt's blockwise format (states/blockwise.py) driven eagerly: dequantize a window,
  the fused 32-bit kernel, requantize, window by window; once with the torch implementation
  (the reference), once with the C kernels (states/native.py) into reused window buffers, at
  two window sizes (the faster is shown).

    python benchmarks/bench_8bit_step.py

Prints the times and ratios (no file is written), and the native kernels' time per value.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zeroopt.states import blockwise, native  # noqa: E402

N = blockwise.BLOCK * 48828  # ~12.5M
WINDOW = blockwise.BLOCK * 1024
NATIVE_WINDOWS = (64 * 1024, 256 * 1024)  # elements
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
            mw = blockwise._dequantize_torch(mq[lo:hi], ma[blocks], signed=True)
            vw = blockwise._dequantize_torch(vq[lo:hi], va[blocks], signed=False)
            torch._fused_adamw_([x[lo:hi]], [g[lo:hi]], [mw], [vw], [], [step], **HP)
            blockwise._quantize_torch(mw, True, codes=mq[lo:hi], absmax=ma[blocks])
            blockwise._quantize_torch(vw, False, codes=vq[lo:hi], absmax=va[blocks])

    def native_windowed(window: int):
        mw, vw = torch.empty(window), torch.empty(window)  # in cache from window to window
        for lo in range(0, N, window):
            hi = min(N, lo + window)
            blocks = slice(lo // blockwise.BLOCK, hi // blockwise.BLOCK)
            mh, vh = mw[: hi - lo], vw[: hi - lo]
            blockwise.dequantize(mq[lo:hi], ma[blocks], True, out=mh)
            blockwise.dequantize(vq[lo:hi], va[blocks], False, out=vh)
            torch._fused_adamw_([x[lo:hi]], [g[lo:hi]], [mh], [vh], [], [step], **HP)
            blockwise.quantize(mh, True, codes=mq[lo:hi], absmax=ma[blocks])
            blockwise.quantize(vh, False, codes=vq[lo:hi], absmax=va[blocks])

    ours = timed(windowed)
    native_rows = []
    if native.available():
        for window in NATIVE_WINDOWS:
            native_rows.append((f"zeroopt native windowed ({window // 1024}K)",
                                timed(lambda: native_windowed(window), repeats=7)))
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
    if native_rows:
        rows.append(min(native_rows, key=lambda row: row[1]))
        print("native windows: " + ", ".join(f"{name} {t:.4f} s" for name, t in native_rows))
    else:
        print("the native kernels are unavailable: their row is skipped")
    print(f"AdamW step on {N / 1e6:.1f}M elements, 1 thread")
    for name, seconds in rows:
        print(f"  {name:<36} {seconds:7.4f} s   {seconds / fused:6.1f}x fused 32-bit")
    if native_rows:
        kernels_alone(mq[:NATIVE_WINDOWS[0]], ma[: NATIVE_WINDOWS[0] // blockwise.BLOCK])


def kernels_alone(codes: torch.Tensor, absmax: torch.Tensor, rounds: int = 200) -> None:
    """The native kernels on their own, on one window that stays in cache (as in the step)."""
    values = blockwise.dequantize(codes, absmax, True)
    spent = {}
    for name, kernel in (("quantize", lambda: blockwise.quantize(values, True, codes, absmax)),
                         ("dequantize", lambda: blockwise.dequantize(codes, absmax, True,
                                                                     out=values))):
        spent[name] = timed(lambda: [kernel() for _ in range(rounds)], repeats=7)
    print(f"native kernels alone, one {values.numel() // 1024}K window in cache: " + ", ".join(
        f"{name} {t / rounds / values.numel() * 1e9:.2f} ns" for name, t in spent.items())
        + " per value (call overhead included)")

if __name__ == "__main__":
    main()
