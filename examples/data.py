"""Byte-level text data for examples/train_gpt.py: the Python standard library's own source.

It exists on every machine with Python, needs no download, and is read in a fixed order, so
every rank (and every run) sees the same token stream.
"""
import os
import pathlib
import sysconfig

import torch


def load_stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """The stdlib *.py files, sorted by relative path, concatenated, cut at max_bytes (uint8)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # site-packages lives under the stdlib dir but differs from machine to machine
        # (and is large): do not even walk into it.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        files += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())  # same order on every machine
    chunks, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
    blob = b"".join(chunks)[:max_bytes]
    if len(blob) == 0:
        raise RuntimeError(f"no *.py files found under {root}")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class ByteBatches:
    """Random (x, y) windows from one split; y is x shifted by one byte."""

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"split has {len(tokens)} bytes, need more than block_size+1 "
                             f"({block_size + 1}); raise data_max_bytes")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        # A private generator: batches depend only on this seed, not on the global RNG.
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, device):
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,),
                               generator=self.gen)
        rows = torch.stack([self.tokens[s:s + self.block_size + 1] for s in starts.tolist()])
        rows = rows.long()
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train_val_split(tokens: torch.Tensor, val_fraction: float):
    """Hold out the last val_fraction of the stream for validation."""
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]
