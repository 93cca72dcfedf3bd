"""Plot the loss curves of several runs of examples/pretrain_llama.py side by side, to a PNG.

    python examples/plot_losses.py runs/compare/adamw runs/compare/lion --out docs/loss.png
    python examples/plot_losses.py runs/compare/* --labels "AdamW" "Lion" ... --smooth 5

Each run is a log_dir: its log_rank0.csv gives the training loss (the mean over ranks) by step
and by wall-clock time, and its summary_rank0.json, when present, the optimizer-state MB per
rank and the validation loss shown in the legend.
"""
import argparse
import csv
import json
import pathlib

try:
    import matplotlib
except ImportError:
    raise SystemExit("examples/plot_losses.py needs matplotlib: pip install matplotlib "
                     "(or pip install -e \".[example]\")") from None

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run_dir: pathlib.Path) -> dict:
    """steps, losses and elapsed seconds from rank 0's CSV, plus its summary if written."""
    log = run_dir / "log_rank0.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: pass the log_dir of a run of "
                                "examples/pretrain_llama.py (it holds log_rank0.csv)")
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log} has no rows yet: the run logged no step (see --log_interval)")
    summary_path = run_dir / "summary_rank0.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return {"step": [int(r["step"]) for r in rows],
            "loss": [float(r["loss_all_ranks"]) for r in rows],
            "elapsed_s": [float(r["elapsed_s"]) for r in rows],
            "summary": summary}


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (1: unchanged), so noisy curves can be told apart."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def legend_label(label: str, summary: dict | None) -> str:
    if summary is None:
        return label
    return (f"{label} (val {summary['val_loss']:.3f}, "
            f"state {summary['state_bytes'] / 2**20:.2f} MB/rank)")


def markdown_table(run_dirs: list[pathlib.Path], labels: list[str]) -> str:
    """One row per run from its summary_rank0.json: the figures docs/EXAMPLES.md quotes."""
    lines = ["| run | final train loss | val loss | tokens/s per rank | opt state MB/rank "
             "| peak RSS MB (rank 0) |", "|---|---|---|---|---|---|"]
    for run_dir, label in zip(run_dirs, labels):
        s = read_run(run_dir)["summary"]
        if s is None:
            lines.append(f"| {label} | (no summary: the run did not finish) | | | | |")
            continue
        lines.append(f"| {label} | {s['final_train_loss']:.3f} | {s['val_loss']:.3f} | "
                     f"{s['tokens_per_s_per_rank']:,.0f} | {s['state_bytes'] / 2**20:.2f} | "
                     f"{s['peak_rss_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def plot(run_dirs: list[pathlib.Path], labels: list[str], out: pathlib.Path, smooth: int = 1,
         title: str = "") -> None:
    runs = [read_run(d) for d in run_dirs]
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for run, label in zip(runs, labels):
        loss = smoothed(run["loss"], smooth)
        line, = by_step.plot(run["step"], loss, label=legend_label(label, run["summary"]))
        by_time.plot(run["elapsed_s"], loss, color=line.get_color())
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("training loss (mean over ranks)" + (f", mean of {smooth} logs"
                                                            if smooth > 1 else ""))
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle(title or "pretrain_llama.py: loss by step and by wall-clock time")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="log_dirs of the runs")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one legend label per run (default: the run directory's name)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="average each point with the previous N-1 logged points")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    labels = args.labels or [d.name for d in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels gave {len(labels)} labels for {len(args.runs)} runs")
    if args.smooth < 1:
        parser.error(f"--smooth must be at least 1, got {args.smooth}")
    plot(args.runs, labels, args.out, args.smooth, args.title)
    print(markdown_table(args.runs, labels))
    parents = sorted({str(d.parent) for d in args.runs})
    print(f"wrote: the plot {args.out}; the runs' logs (log_rank*.csv, summary_rank*.json) are in "
          + (f"{parents[0]}/<run>" if len(parents) == 1 else ", ".join(map(str, args.runs))))


if __name__ == "__main__":
    main()
