"""bench_checkpoint: checkpoints against DeepSpeed and torch (run the folder: `python benchmarks/bench_checkpoint`).

- measure.py:    the fsync / sha256 / DCP timers, one timed collective call, bytes on disk, and the
                 fingerprint of a model + optimizer state that the loads are checked against;
- contenders.py: zeroopt, DeepSpeed ZeRO-1/2 and torch's ZeroRedundancyOptimizer, each one rank's
                 train step, save, load and fingerprint;
- jobs.py:       the W=2 save/load job, the W=1 (resharding) load job, spawning them in fresh
                 processes, and a round of every contender;
- report.py:     the markdown section.

The modules import `_common` as the other benchmarks do: bench_checkpoint/__main__.py puts benchmarks/ (and
the repository root, for the zeroopt of this checkout) on sys.path first.
"""
