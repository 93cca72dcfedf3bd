"""Run one check on N XLA:CPU replicas, the way torch_xla supports on CPU: one process with
CPU_NUM_DEVICES=N devices and one thread per device (xmp.spawn on CPU does exactly this).

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python tests/xla/replicas.py collectives

Each replica returns a JSON-able result; this prints one line ``RESULT <json>`` with
{rank: result}. The tests run it as a subprocess under a timeout: a collective that some replica
never joins makes XLA abort the whole process, and must not take pytest down with it.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import threading

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's zeroopt


def collectives():
    import torch

    from zeroopt.comm.xla import mark_step, xla_collectives

    comm = xla_collectives()
    dev, r, w = comm.device, comm.rank, comm.world_size
    out = {"rank": r, "world_size": w}

    # reduce_bucket: chunk r holds the sum over ranks; 5 elements per chunk
    bucket = (torch.arange(5 * w, dtype=torch.float32) * (r + 1)).to(dev)
    comm.reduce_bucket(bucket).wait()
    out["reduced_chunk"] = bucket.chunk(w)[r].cpu().tolist()

    # gather_bucket: every chunk holds its owner's chunk
    bucket = torch.full((4 * w,), -1.0)
    bucket[4 * r:4 * r + 4] = torch.arange(4) + 10.0 * r
    bucket = bucket.to(dev)
    comm.gather_bucket(bucket).wait()
    out["gathered"] = bucket.cpu().tolist()

    for op in ("sum", "max", "min"):  # odd sizes and 0-d tensors, fp32 and fp64
        t = (torch.arange(7, dtype=torch.float32) - 3.0 * r).to(dev)
        comm.all_reduce(t, op=op)
        s = torch.tensor(float(r + 1), dtype=torch.float64).to(dev)
        comm.all_reduce(s, op=op)
        out[f"all_reduce_{op}"] = t.cpu().tolist()
        out[f"all_reduce_{op}_scalar"] = s.cpu().item()

    t = torch.full((3, 2), float(r + 7)).to(dev)
    comm.broadcast(t, src=w - 1)
    out["broadcast"] = t.cpu().tolist()
    i = torch.tensor([r * 5 + 1], dtype=torch.int64).to(dev)
    comm.broadcast(i, src=0)
    out["broadcast_int"] = i.cpu().tolist()

    out["objects"] = comm.all_gather_object({"rank": r, "pad": "x" * (3 * r)})
    comm.barrier()

    # several steps of the same graph: channel ids restart at each sync, so it compiles once
    for step in range(3):
        b = torch.ones(2 * w).to(dev) * (step + 1)
        comm.reduce_bucket(b)
        comm.gather_bucket(b)
        mark_step()
    out["after_steps"] = b.cpu().tolist()
    return out


_RNG_LOCK = threading.Lock()
_MEETINGS: dict[int, threading.Barrier] = {}
_MEETINGS_LOCK = threading.Lock()


def _all_replicas_here(world: int) -> None:
    """Wait until every replica (a thread of this process) is here."""
    with _MEETINGS_LOCK:
        meeting = _MEETINGS.setdefault(world, threading.Barrier(world))
    meeting.wait(timeout=600)


def _args() -> dict:
    return json.loads(os.environ.get("ZEROOPT_XLA_CHECK_ARGS", "{}"))


def _adam_updates_views(device) -> bool:
    """Whether zeroopt's adamw step updates params that are views of one flat buffer on
    ``device`` (torch's CPU fallback of torch._fused_adamw_ on XLA would not; adam.py runs a
    foreach step where there is no fused kernel)."""
    import torch

    from zeroopt.algorithms import ShardTensors, get_rule

    rule = get_rule("adamw")
    flat = torch.ones(8, device=device)
    shard = ShardTensors([flat[:4], flat[4:]], [torch.ones(4, device=device)] * 2,
                         {"exp_avg": [torch.zeros(4, device=device) for _ in range(2)],
                          "exp_avg_sq": [torch.zeros(4, device=device) for _ in range(2)]})
    group = dict(rule.defaults, lr=0.1)
    rule.fused_step(group, shard, torch.ones(()), None)
    return bool((flat.cpu() != 1).all())


def train():
    """ZeroOptimizer (``optimizer``, sharded over the replicas) on the XLA device against an
    unsharded reference on the CPU fed the gradient averaged over the replicas' batches:
    torch.optim.AdamW for "adamw", else zeroopt's own optimizer at W = 1 on the CPU (which
    the main suite holds to each rule's reference package)."""
    import torch

    import zeroopt
    from zeroopt.comm.xla import mark_step, xla_collectives

    args = _args()
    steps, stage = int(args.get("steps", 4)), int(args.get("stage", 1))
    name = args.get("optimizer", "adamw")
    comm = xla_collectives()
    dev, r, w = comm.device, comm.rank, comm.world_size
    updates_views = _adam_updates_views(dev)
    mark_step()

    def model():
        with _RNG_LOCK:  # the replicas are threads of one process: one global RNG
            torch.manual_seed(0)  # same init everywhere; sizes that do not divide by 2, 3, 4
            return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Tanh(),
                                       torch.nn.Linear(29, 23), torch.nn.Tanh(),
                                       torch.nn.Linear(23, 1))

    def batch(rank, step):
        g = torch.Generator().manual_seed(1000 * step + rank)
        return torch.randn(6, 37, generator=g), torch.randn(6, 1, generator=g)

    hyper = dict(lr=1e-2, weight_decay=0.1, **args.get("hyper", {}))
    if name == "adamw":
        hyper.update(betas=(0.9, 0.99), eps=1e-8)
    def groups(module):
        """GaLore: the matrices projected (galore-torch's groups, a ``rank`` in the group)."""
        params = list(module.parameters())
        if "galore_rank" not in args:
            return params
        projected = dict(rank=int(args["galore_rank"]), scale=0.25, proj_type="std",
                         update_proj_gap=int(args.get("update_proj_gap", 2)))
        return [dict(params=[p for p in params if p.dim() == 2], **projected),
                dict(params=[p for p in params if p.dim() != 2])]

    options = {k: args[k] for k in ("skip_nonfinite",) if k in args}  # else the default: on
    # "reference": "xla" - the unsharded run on this replica's own XLA device (zeroopt at W = 1:
    # no launcher, so a single rank), for rules whose result depends on the backend's own
    # arithmetic beyond rounding (GaLore: the signs of the SVD's singular vectors)
    on_xla = args.get("reference") == "xla"
    ref_device = dev if on_xla else torch.device("cpu")
    ref = model().to(ref_device)
    if name == "adamw":
        ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **hyper)
    else:
        ref_opt = zeroopt.ZeroOptimizer(groups(ref), optimizer=name, **options, **hyper)
    net = model().to(dev)
    opt = zeroopt.ZeroOptimizer(groups(net), optimizer=name, stage=stage, backend="xla",
                                bucket_numel=int(args.get("bucket_numel", 600)), **options,
                                **hyper)
    clip = float(args.get("clip", 0.0))
    mark_step()
    compiles, executions = [], []
    for step in range(steps):
        # graphs compiled by all replicas so far, once every graph shape a step takes was seen
        # (from step 2; GaLore's projector refresh every other step: from step 4)
        if step in (int(args.get("steady_from", 2)), steps - 1):
            comm.barrier()
            # The counts are the process's (every replica's): read them while no replica
            # runs a graph, so that each reading sees every replica's barrier and nothing more.
            _all_replicas_here(w)
            compiles.append(_compile_count())
            executions.append(_metric_count("ExecuteTime"))
            _all_replicas_here(w)
        x, y = batch(r, step)
        loss = torch.nn.functional.mse_loss(net(x.to(dev)), y.to(dev))
        if step == args.get("inf_step") and r == w - 1:  # one replica's gradient overflows
            loss = loss * float("inf")
        loss.backward()
        if clip:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
        mark_step()
        ref_opt.zero_grad()
        if step == args.get("inf_step"):  # skipped: params and states untouched
            continue
        for rank in range(w):  # the average of every replica's gradient
            xr_, yr_ = batch(rank, step)
            (torch.nn.functional.mse_loss(ref(xr_.to(ref_device)), yr_.to(ref_device))
             / w).backward()
        if clip:  # a ZeroOptimizer consumes p.grad in backward: it clips with its own
            (torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) if name == "adamw"
             else ref_opt.clip_grad_norm_(clip))
        ref_opt.step()
        if on_xla:  # the reference's own graph, apart from the next step's
            mark_step()
    got = [p.detach().cpu() for p in net.parameters()]
    init = list(model().parameters())
    want = [p.detach().cpu() for p in ref.parameters()]
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    moved = max(float((a - b).abs().max()) for a, b in zip(want, init))
    return {"max_abs_diff": diff, "moved": moved, "world_size": w,
            "skipped_steps": opt.skipped_steps,
            "adam_updates_views": updates_views,
            "compiles_in_later_steps": compiles[-1] - compiles[0] if len(compiles) == 2 else None,
            # graphs run by all replicas from then on (process-wide), and the steps they cover
            "executions_in_later_steps": executions[-1] - executions[0] if len(executions) == 2
            else None, "later_steps": steps - 1 - int(args.get("steady_from", 2)),
            "cpu_fallbacks": _cpu_fallbacks()}


_FAULTY: set[int] = set()  # replicas whose checkpoint writes fail (checkpoint's failing save)


def checkpoint_model(torch):
    """The model of ``checkpoint`` (the same init on every replica and in the test process)."""
    with _RNG_LOCK:  # the replicas are threads of one process: one global RNG
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Tanh(),
                                   torch.nn.Linear(29, 23), torch.nn.Tanh(),
                                   torch.nn.Linear(23, 1))


def checkpoint_batch(step: int, rank: int, world: int):
    """Rank ``rank``'s rows of step ``step``'s global batch of 12 (the same data at any W, so
    runs at W = 1, 2, 3, 4 see the same averaged gradient)."""
    import torch

    g = torch.Generator().manual_seed(500 + step)
    x, y = torch.randn(12, 37, generator=g), torch.randn(12, 1, generator=g)
    rows = slice(rank * 12 // world, (rank + 1) * 12 // world)
    return x[rows], y[rows]


def checkpoint():
    """save_checkpoint / load_checkpoint on XLA replicas. Args: ``dir`` (a directory shared by
    the runs), ``optimizer``, ``stage``, ``steps``, and either ``save_at`` (train, save
    ``dir/mid`` after that many steps, then a save that fails on the last replica, then train
    on and save ``dir/end``) or ``resume`` (load ``dir/mid`` at this W, continue to ``steps``,
    save ``dir/<tag>``). Returns the params after ``save_at`` steps and at the end, and what
    the failing save did."""
    import errno

    import torch

    import zeroopt
    from zeroopt.checkpoint import errors
    from zeroopt.comm.xla import mark_step, xla_collectives

    args = _args()
    root = pathlib.Path(args["dir"])
    comm = xla_collectives()
    dev, r, w = comm.device, comm.rank, comm.world_size
    net = checkpoint_model(torch).to(dev)
    opt = zeroopt.ZeroOptimizer(net.parameters(), optimizer=args.get("optimizer", "adamw"),
                                stage=int(args.get("stage", 1)), backend="xla",
                                bucket_numel=600, lr=1e-2, weight_decay=0.1)
    mark_step()
    out = {"world_size": w}
    first = 0
    if "resume" in args:
        out["extra"] = zeroopt.load_checkpoint(str(root / args["resume"]), net, opt)
        first = out["extra"]["step"]
        mark_step()
        out["loaded_params"] = [p.detach().cpu().reshape(-1).tolist() for p in net.parameters()]
    for step in range(first, int(args["steps"])):
        x, y = checkpoint_batch(step, r, w)
        torch.nn.functional.mse_loss(net(x.to(dev)), y.to(dev)).backward()
        opt.step()
        opt.zero_grad()
        mark_step()
        if step + 1 == args.get("save_at"):
            zeroopt.save_checkpoint(str(root / "mid"), net, opt, step=step + 1)
            out["mid_params"] = [p.detach().cpu().reshape(-1).tolist() for p in net.parameters()]
            out["failed_save"] = _failing_save(zeroopt, errors, errno, root, net, opt, r, w)
    zeroopt.save_checkpoint(str(root / args.get("tag", "end")), net, opt, step=int(args["steps"]))
    out["params"] = [p.detach().cpu().reshape(-1).tolist() for p in net.parameters()]
    out["listing"] = sorted(p.name for p in root.iterdir())
    return out


def _failing_save(zeroopt, errors, errno, root, net, opt, rank, world) -> dict:
    """A save over ``root/mid`` whose writes fail on the last replica (a full disk there):
    every replica should raise the same CheckpointError and leave ``mid`` as it was."""
    with _RNG_LOCK:  # once, for every replica's thread
        if not getattr(errors.Writer, "_zeroopt_test_fault", False):
            write = errors.Writer.write_data

            def faulty(self, plan, planner):
                import torch_xla.runtime as xr

                if xr.global_ordinal() in _FAULTY:
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                return write(self, plan, planner)

            errors.Writer.write_data = faulty
            errors.Writer._zeroopt_test_fault = True
    if rank == world - 1:
        _FAULTY.add(rank)
    try:
        zeroopt.save_checkpoint(str(root / "mid"), net, opt, step=-1)
        seen = {"raised": None}
    except Exception as error:  # noqa: BLE001 - the test compares what each replica saw
        seen = {"raised": type(error).__name__, "message": str(error)}
    finally:
        _FAULTY.discard(rank)
    seen["listing"] = sorted(p.name for p in root.iterdir())
    return seen


def _cpu_fallbacks() -> list[str]:
    """aten ops that XLA ran on the CPU (each one cuts the graph and syncs)."""
    import torch_xla.debug.metrics as met

    return sorted(k for k in met.counter_names() if k.startswith("aten::"))


def _compile_count() -> int:
    return _metric_count("CompileTime")


def _metric_count(name: str) -> int:
    """How many samples torch_xla's metric ``name`` took in this process (all replicas)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data(name)
    return int(data[0]) if data else 0


CHECKS = {"checkpoint": checkpoint, "collectives": collectives, "train": train}


def _replica(index: int, name: str, results_dir: str) -> None:
    import torch_xla.runtime as xr

    if index == 0 and os.environ.get("ZEROOPT_XLA_DUMP_AFTER"):  # debugging a stall
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["ZEROOPT_XLA_DUMP_AFTER"]), repeat=True)

    result = CHECKS[name]()
    path = pathlib.Path(results_dir) / f"{xr.global_ordinal()}.json"
    path.write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    import tempfile

    from zeroopt.comm.xla import cpu_replicas_environment

    cpu_replicas_environment(int(os.environ.get("CPU_NUM_DEVICES", "2")))  # before torch_xla
    import torch_xla.distributed.xla_multiprocessing as xmp

    name = argv[0]
    if len(argv) > 1:  # a JSON dict of the check's arguments
        os.environ["ZEROOPT_XLA_CHECK_ARGS"] = argv[1]
    with tempfile.TemporaryDirectory() as results:
        xmp.spawn(_replica, args=(name, results))
        out = {int(p.stem): json.loads(p.read_text())
               for p in pathlib.Path(results).glob("*.json")}
    print("RESULT " + json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
