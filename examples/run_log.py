"""Per-rank training logs for examples/pretrain_llama.py: a CSV file per rank, TensorBoard when
it is installed and asked for, and the memory figures that go in them.

    log_dir/log_rank{r}.csv       one row per log step (COLUMNS), written as it goes
    log_dir/tensorboard/rank{r}/  the same scalars, if `tensorboard` is installed and enabled
"""
import csv
import math
import os
import pathlib
import resource
import sys

import torch

COLUMNS = ("rank", "step", "loss", "loss_all_ranks", "lr", "grad_norm", "tokens_per_s_total",
           "tokens_per_s_per_rank", "tokens_seen", "elapsed_s", "rss_mb", "peak_rss_mb",
           "state_mb", "device_state_mb", "cuda_max_allocated_mb")
MB = 2 ** 20


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; psutil elsewhere; 0 if neither)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return 0
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS says bytes, Linux KiB


def memory_columns(opt, device: torch.device) -> dict:
    cuda = ""
    if device.type == "cuda":
        cuda = round(torch.cuda.max_memory_allocated(device) / MB, 3)
    rss = rss_bytes()
    # The kernel updates the peak lazily, so it can trail a fresh reading of the current RSS.
    peak = max(rss, peak_rss_bytes())
    return {"rss_mb": round(rss / MB, 3), "peak_rss_mb": round(peak / MB, 3),
            "state_mb": round(opt.state_bytes() / MB, 4),
            "device_state_mb": round(opt.device_state_bytes() / MB, 4),
            "cuda_max_allocated_mb": cuda}


class RunLog:
    """Appends rows to this rank's CSV (flushed each row, so a crashed run keeps its log) and
    mirrors the numeric columns to TensorBoard when a writer could be made."""

    def __init__(self, log_dir: str, rank: int, tensorboard: bool, note=print,
                 keep_until_step: int | None = None):
        """keep_until_step (a resumed run): keep the existing rows up to that step, so the
        file reads as one run; None starts a new file."""
        self.dir = pathlib.Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"log_rank{rank}.csv"
        kept = []
        if keep_until_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
        self._file = open(self.path, "w", newline="")
        # "ignore": kept rows of an older file may have columns since renamed (write() checks
        # the new rows' keys itself).
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._tb = None
        self.tensorboard_dir = None  # where the TensorBoard events go, when they do
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # optional: the CSV has everything
                note(f"tensorboard logging is on in the config but unavailable ({error}); "
                     "logging to CSV only. Fix: pip install tensorboard, or set "
                     "--tensorboard false")
            else:
                self.tensorboard_dir = self.dir / "tensorboard"
                self._tb = SummaryWriter(str(self.tensorboard_dir / f"rank{rank}"))

    def write(self, row: dict) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"not log columns: {sorted(unknown)}; add them to run_log.COLUMNS")
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("rank", "step") and isinstance(value, (int, float)) \
                        and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
