"""The markdown section of bench_checkpoint.py, rendered from the results of every round."""

from __future__ import annotations

import statistics

from .contenders import BASE, CONTENDERS, LR, TRAIN_STEPS, WIDTH


def med(calls, key="s"):
    vals = [c[key] for c in calls]
    return statistics.median(vals) if vals else None


def best(calls, key="s"):
    return min(c[key] for c in calls) if calls else None


def fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def check_text(c) -> str:
    if not c:
        return "not checked"
    if c.get("ok"):
        return "equal (bit-exact sums)" if c.get("exact") else f"equal within {c['max_rel']:.1e}"
    return f"DIFFERENT ({c.get('why') or 'max rel. diff %.2e at %s' % (c['max_rel'], c['where'])})"


NOTES = """\
How it is measured:
- *save* / *load*: one collective call on every rank, with a barrier before and after; the
  slowest rank's seconds; the median over `--reps` calls per job and all rounds. Saves go to a
  fresh directory each time; loads read the checkpoint just written (page cache warm, for every
  contender alike: these times are CPU and memory bound, not disk bound). The W=2 loads go into
  the live optimizer after one more training step; the W=1 loads into a fresh model and
  optimizer in a new single-rank job (gloo, world size 1). *state after load* compares the
  float64 sum and sum of squares of every param, `exp_avg` and `exp_avg_sq` (the optimizer's
  state gathered whole: `opt.state_dict()` for zeroopt, `consolidate_state_dict` for torch,
  `deepspeed.utils.safe_get_full_optimizer_state` for DeepSpeed) and the step count with the
  state that was saved.
- *on disk*: apparent size of every file the save wrote (DeepSpeed: the tag directory plus
  `latest` and the `zero_to_fp32.py` script it copies in).
- zeroopt *sha256* / *fsync*: seconds inside `zeroopt.checkpoint.directory._file_facts`
  (hashing, each rank a share of the files; the slowest rank's) and inside `os.fsync` (any
  caller: DCP's `FileSystemWriter(sync_files=True)` fsyncs every file it writes, zeroopt the
  manifest and the directories), by wrapping them in the benchmark's processes. The *fsync
  calls* column counts them for every contender over all ranks.
- DeepSpeed W=1: `ds_to_universal.main` with `--inject_missing_state` (a plain `nn.Module` has
  no `universal_checkpoint_info`; without it the converter stops with an assertion), 2 extract
  and 1 merge workers (2 cores), run inside the W=1 job; then `engine.load_checkpoint(dir,
  tag="ckpt_universal")` with `"checkpoint": {"load_universal": true}`. *reshard total* =
  conversion + median load.

Why the times differ (what each call does, from the code):
- zeroopt's save does more than the anchors' on purpose: DCP writes each rank's file with
  `sync_files=True` (an fsync per file, so the checkpoint is on disk when the call returns;
  DeepSpeed's `torch.save` and torch's make no fsync, their data may still be only in the page
  cache), then every byte is read back once more to sha256 it for the manifest, then the
  manifest is written and the directory swapped in. A load reads every byte twice: the sha256
  verification, then DCP's read. The sha256 column is that extra pass; it is the price of a
  load that refuses a damaged file, and it grows with the checkpoint, not with W.
- DeepSpeed ZeRO-1/2 writes 16 B/param: the module's fp32 params (rank 0) plus, per rank, its
  partition's fp32 copy (`single_partition_of_fp32_groups`, kept even for fp32 params) and
  AdamW's m and v. zeroopt and torch write 12 B/param (params, m, v).
- torch ZeroRedundancyOptimizer's save is slow because `consolidate_state_dict` sends each
  rank's state to rank 0 as a pickled object (`_broadcast_object`), then rank 0 alone
  `torch.save`s the whole dict while the other ranks wait. Its load is fast here because the
  single file is in the page cache, but every rank reads the whole file (all ranks' state)
  and keeps its own part: W times the bytes read, and every rank needs memory for the whole
  state. Its `load_state_dict` picks each param's state out of the consolidated dict by the
  param's global index, so the dict is not tied to the world size that saved it: pytorch issue
  #65650 (2021, "partition doesn't match" when resuming on another number of GPUs) does not
  happen with torch 2.13 (see the W=1 column). It sets the other ranks' entries of the dict it
  is given to None, so a dict cannot be loaded twice.
- DeepSpeed refuses a plain load at another data-parallel size; `ds_to_universal` rewrites
  the checkpoint as one file per param and state (extract with a process pool, merge, save
  the common state), a separate offline step that takes seconds and doubles the disk use.
"""


def render(results, args, machine, runtime_s, command) -> str:
    params = next((r["params"] for r in results.values() if "params" in r), 0)
    base = results.get(BASE, {})
    lines = [
        "## Checkpoints: save, load, and load at another world size",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; Python "
        f"{machine['python']}, torch {machine['torch']}, deepspeed {machine['deepspeed']}; "
        f"{machine['date']}.",
        "",
        f"Command: `{command}` (total {runtime_s:.0f} s)",
        "",
        f"Model: {args.layers} x Linear({WIDTH}, {WIDTH}) + ReLU, {params / 1e6:.2f}M fp32 params "
        f"(bench_zero.py's), AdamW lr={LR}, saved after {TRAIN_STEPS} training steps at W="
        f"{args.ranks} (gloo, CPU, {args.threads} thread(s) per rank). Medians over {args.reps} "
        f"calls per job x {args.rounds} round(s) run round-robin, each job in fresh processes. "
        f"Model + AdamW state is {12 * params / 2**20:.0f} MiB of fp32 (4 B/param params + 8 B "
        "m, v).",
        "",
        "*cores busy elsewhere*: mean number of cores other processes used during this "
        "contender's jobs (0 = idle machine).",
        "",
        f"| contender | save s, W={args.ranks}: median (best) | load s, W={args.ranks}: median (best) "
        "| on disk MiB (files) "
        f"| fsync calls per save | load at W=1 of the W={args.ranks} checkpoint | W=1 load s: median (best) "
        "| state after load (W=2 / W=1) | cores busy elsewhere |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for name, r in results.items():
        label = CONTENDERS[name][0]
        if not r.get("saves"):
            lines.append(f"| {label} | failed: {str(r.get('error', '?'))[:200].replace('|', '/')} "
                         "|||||||")
            continue
        w1 = med(r["w1_loads"])
        if name.startswith("ds"):
            if r["convert_s"]:
                conv = statistics.median(r["convert_s"])
                how = (f"ds_to_universal {conv:.2f} s + load_universal"
                       + (f"; reshard total {conv + w1:.2f} s" if w1 is not None else ""))
            else:
                how = f"ds_to_universal failed: {r.get('w1_convert_error', '?')}"
        elif name == "torch_zero":
            how = "torch.load + load_state_dict of the consolidated dict"
        else:
            how = "load_checkpoint directly"
        if r.get("w1_error"):
            how += f"; FAILED: {r['w1_error'][:200]}"
        fsyncs = statistics.median(c["fsync_n"] for c in r["saves"])
        lines.append(
            f"| {label} | {med(r['saves']):.3f} ({best(r['saves']):.3f}) | {med(r['loads']):.3f} "
            f"({best(r['loads']):.3f}) | "
            f"{r['bytes'] / 2**20:.1f} ({r['files']}) | {fsyncs:.0f} | {how.replace('|', '/')} | "
            f"{fmt(w1, '.3f')} ({fmt(best(r['w1_loads']), '.3f')}) | "
            f"{check_text(r.get('loaded'))} / {check_text(r.get('w1_check'))} | "
            f"{max(r['other']):.2f} |")

    # Ratios: zeroopt / each anchor.
    if base.get("saves"):
        lines += ["", "zeroopt stage 1 relative to each anchor, zeroopt ÷ anchor (below 1: zeroopt "
                  "faster or smaller); times as median ratio (ratio of the best calls):", "",
                  "| anchor | save | load (W=2) | bytes on disk | load at W=1 (resharding) |",
                  "|---|---:|---:|---:|---:|"]

        def ratio(key, r):
            return (f"{med(base[key]) / med(r[key]):.2f} "
                    f"({best(base[key]) / best(r[key]):.2f})")

        for name, r in results.items():
            if name == BASE or not r.get("saves"):
                continue
            if not (base["w1_loads"] and r["w1_loads"] and (r.get("w1_check") or {}).get("ok")):
                w1_ratio = "n/a (the anchor did not load it correctly)"
            elif name.startswith("ds") and r["convert_s"]:
                conv, w1_base = statistics.median(r["convert_s"]), med(base["w1_loads"])
                w1_ratio = (f"{w1_base / (conv + med(r['w1_loads'])):.2f} vs conversion + load; "
                            f"{ratio('w1_loads', r)} vs the load alone")
            else:
                w1_ratio = ratio("w1_loads", r)
            lines.append(f"| {CONTENDERS[name][0]} | {ratio('saves', r)} | {ratio('loads', r)} | "
                         f"{base['bytes'] / r['bytes']:.2f} | {w1_ratio} |")

        lines += ["", "Where zeroopt's time goes (slowest rank's seconds, medians of each part; "
                  "sha256 is not inside DCP's calls, most fsyncs are):", "",
                  "| zeroopt call | total | dcp.save / dcp.load | sha256 (manifest / verify) "
                  "| fsync | the rest |", "|---|---:|---:|---:|---:|---:|"]
        for label, calls in ((f"save, W={args.ranks}", base["saves"]),
                             (f"load, W={args.ranks}", base["loads"]),
                             ("load at W=1 (one rank hashes every file)", base["w1_loads"])):
            if not calls:
                continue
            total = med(calls)
            rest = statistics.median(c["s"] - c["dcp_s"] - c["hash_s"] for c in calls)
            lines.append(f"| {label} | {total:.3f} | " + " | ".join(
                f"{med(calls, k):.3f} ({100 * med(calls, k) / total:.0f}%)"
                for k in ("dcp_s", "hash_s", "fsync_s")) + f" | {rest:.3f} ({100 * rest / total:.0f}%) |")
        lines += ["", f"Each zeroopt save and each load hashes all {base['bytes'] / 2**20:.0f} MiB of "
                  "the checkpoint once, the files split over the ranks. *the rest*: building the "
                  "items (`model.state_dict()`, the optimizer's ranges), gathering file lists and "
                  "hashes, writing the manifest, the directory swap, and waiting at the barriers."]

    # What the anchors do when asked to load at another world size.
    lines += ["", "Loading the W=2 checkpoint at W=1 without conversion:", ""]
    for name, r in results.items():
        if "plain_w1" in r:
            p = r["plain_w1"]
            what = (f"loads without error; state {check_text(p.get('check'))}" if p["loaded"]
                    else f"fails: `{p['error'][:300]}`")
            lines.append(f"- {CONTENDERS[name][0]}, plain `engine.load_checkpoint`: {what}")
        elif name == "torch_zero" and r.get("saves"):
            what = (f"fails: `{r['w1_error'][:300]}`" if r.get("w1_error")
                    else f"loads; state {check_text(r.get('w1_check'))}")
            lines.append(f"- torch ZeroRedundancyOptimizer, consolidated dict at W=1: {what}")
        elif name == BASE and r.get("saves"):
            lines.append(f"- zeroopt: `load_checkpoint` at W=1; state {check_text(r.get('w1_check'))}")
    if any("universal_bytes" in r for r in results.values()):
        lines += [""] + [f"DeepSpeed's universal checkpoint ({CONTENDERS[n][0]}) takes "
                         f"{r['universal_bytes'] / 2**20:.1f} MiB more on disk." for n, r in
                         results.items() if "universal_bytes" in r]
    failures = [f"- {CONTENDERS[n][0]}, {f}" for n, r in results.items() for f in r.get("failures", [])]
    if failures:
        lines += ["", "Jobs that failed or aborted (the tables use the other rounds):", ""] + failures
    lines += ["", "Implementations: " + "; ".join(
        f"{CONTENDERS[n][0]}: {r['info']}" for n, r in results.items() if r.get("info")) + ".", "",
        NOTES]
    return "\n".join(lines)
