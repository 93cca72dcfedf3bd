"""FusedOptimizer: one of zeroopt's element-wise rules as a plain, unsharded torch optimizer,
with its states kept in zeroopt's forms (32-bit, bf16, 8-bit blockwise, paged).

It is meant for optimizers that shard the state themselves, DeepSpeed ZeRO stage 1 and 2 above
all: they hand their optimizer one flat fp32 partition per param group, with ``.grad`` set,
call step(), and save its state_dict() per rank::

    opt = zeroopt.FusedOptimizer(model.parameters(), "adamw_8bit", lr=1e-3, weight_decay=0.1)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True})

Each param is stepped by the rule's own fused step (the one ZeroOptimizer runs on its shards):
in place where its states are resident fp32, else window by window (decode the window's states
into fp32, step, encode them back), as ``shard_windows.py`` describes. 8-bit applies per param
on its full size (``min_8bit_size``), which under DeepSpeed is the size of a rank's partition.

Only element-wise rules: a rule that needs whole params (LAMB's and LARS' trust ratios,
cautious masking, GaLore's projections, Adafactor's factored moments) is refused, since a
DeepSpeed partition mixes pieces of many params. ZeroOptimizer runs those across its shards.

step() consumes the gradients, as ZeroOptimizer's does: a rule may overwrite ``.grad`` (DeepSpeed
drops the partition's gradient after the step anyway). ``state_dict()`` is torch.optim's, per
param: fp32 or bf16 values, or 8-bit codes with ``<name>_absmax`` (bitsandbytes' form); any of
them loads into any precision.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..algorithms import ShardTensors, get_preset
from ..algorithms.base import UpdateRule, resolve_defaults
from ..shard import initial_fill
from ..shard_windows import Window, run, window_numel_for
from ..checkpoint import encoding
from ..states import kinds
from ..states.kinds import STATE_DEFAULTS
from ..states.storage import RegionStates


@dataclass
class _ParamStates:
    region: RegionStates
    step: torch.Tensor  # the step counter, shared with the public state dict
    fresh: bool  # its initial values (Adagrad's accumulator) are still to be set


class FusedOptimizer(torch.optim.Optimizer):
    """One of zeroopt's element-wise rules as a plain, unsharded torch optimizer (see the
    module docstring).

    Args:
        params: an iterable of contiguous fp32 params, or of param group dicts, as
            torch.optim takes them.
        optimizer: a registered name (``zeroopt.available_optimizers()``), default "adamw";
            the name's preset (e.g. ``state_precision="8bit"`` for "adamw_8bit") applies.
        window_numel: elements per window for states not kept as resident fp32 (default
            None: 2**18 on CPU, 2**22 on accelerators); a positive multiple of 256 (whole
            8-bit blocks).
        page_dir: the directory of the memory-mapped files of paged CPU states (default
            None: the system's temporary directory).
        **hyperparameters: the rule's hyperparameters (overriding its defaults and the
            name's preset), and ``state_precision`` ("32bit", "bf16", "8bit", "4bit"),
            ``min_8bit_size``, ``block_size``, ``paged``.

    Raises:
        ValueError: an unknown name, a bad ``window_numel``, an invalid hyperparameter, or a
            rule (with these hyperparameters) that needs whole params or eval()/train().
        TypeError: an unknown hyperparameter.
    """

    def __init__(self, params, optimizer: str = "adamw", *, window_numel: int | None = None,
                 page_dir: str | None = None, **hyperparameters):
        self.rule, preset = get_preset(optimizer)
        self.name = optimizer
        window_numel_for(window_numel, torch.device("cpu"))  # a bad value fails here, not in step
        self._window_arg, self._page_dir = window_numel, page_dir
        self._stored: dict[torch.Tensor, _ParamStates] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}  # (state name, device) -> fp32 window
        super().__init__(params, resolve_defaults(self.rule, {**preset, **hyperparameters}))

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, as torch.optim does, and check it.

        Args:
            param_group: a dict with ``"params"`` and any hyperparameters to override.

        Raises:
            ValueError: an invalid hyperparameter or state-storage option, or one that makes
                the rule need whole params; the group is then not added.
        """
        super().add_param_group(param_group)  # fills in the defaults the checks read
        group = self.param_groups[-1]
        try:
            self.rule.validate(group)
            kinds.validate(group, self.rule)
            _refuse_whole_param_rules(self.rule, self.name, group)
        except ValueError:
            self.param_groups.pop()  # a refused group is not left behind
            raise

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param with a gradient, by the rule's fused step (in place
        where the states are resident fp32, else window by window). Params whose ``grad``
        is None are skipped. The gradients are consumed (a rule may overwrite them).

        Args:
            closure: re-evaluates the model and returns the loss (optional), run with
                gradients enabled.

        Returns:
            The closure's loss, or None.

        Raises:
            TypeError: a param is not a contiguous fp32 tensor (checked on its first step).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.rule.before_step:
                self.rule.before_step(group)
            for p in params:
                stored = self._states_of(p, group)
                windows = self._windows(p, stored.region, group)
                if stored.fresh:
                    _set_initial_values(self.rule, group, windows)
                    stored.fresh = False
                stored.step += 1

                def update(shard: ShardTensors, step=stored.step) -> None:
                    self.rule.fused_step(group, shard, step, None)

                run(windows, update, load=True, store=True)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's checks and hyperparameters, then each param's saved states encoded into
        this optimizer's forms (8-bit codes copied as they are where both are 8-bit)."""
        storage = [{k: group[k] for k in STATE_DEFAULTS} for group in self.param_groups]
        # The states are not handed to torch: it would cast 8-bit codes to the params' dtype.
        super().load_state_dict({**state_dict, "state": {}})
        for group, options in zip(self.param_groups, storage):
            group.update(options)  # how this optimizer stores states is its own choice
        self.state, self._stored = defaultdict(dict), {}
        params = dict(zip((i for group in state_dict["param_groups"] for i in group["params"]),
                          ((p, group) for group in self.param_groups for p in group["params"])))
        for index, saved in state_dict["state"].items():
            p, group = params[index]
            stored = self._states_of(p, group)
            for name in self.rule.states(group):
                why = (encoding.check_saved(saved, name, p.numel()) if name in saved
                       else f"no state {name!r} (it has {sorted(saved)})")
                if why:
                    raise ValueError(f"cannot load the saved state of a param of shape "
                                     f"{list(p.shape)} into {self.name}: {why}")
                encoding.load_piece(stored.region, name, saved, 0, p.numel(), 0)
            stored.step.fill_(float(saved.get("step", 0)))
            stored.fresh = False

    # -- internals ------------------------------------------------------------------------

    def _states_of(self, p: torch.Tensor, group: dict) -> _ParamStates:
        """``p``'s states, created (zero) on first use, and published in ``self.state[p]`` as
        views: what state_dict() saves."""
        if p in self._stored:
            return self._stored[p]
        if p.dtype != torch.float32 or not p.is_contiguous():
            raise TypeError(f"FusedOptimizer steps contiguous fp32 params (DeepSpeed ZeRO hands it "
                            f"its fp32 partitions); got {p.dtype}, contiguous={p.is_contiguous()}. "
                            "For 16-bit params use zeroopt.ZeroOptimizer, which keeps fp32 masters")
        kind = kinds.kind_of(group, p.numel())
        padded = -(-p.numel() // kind.block_numel) * kind.block_numel  # 8-bit: whole blocks
        region = RegionStates(self.rule.states(group), self.rule.nonnegative_states, padded, kind,
                              p.device, self._page_dir)
        stored = _ParamStates(region, torch.zeros((), dtype=torch.float32), fresh=True)
        self._stored[p] = stored
        public = {"step": stored.step}
        for name in self.rule.states(group):
            for saved, (tensor, per) in region.encoded(name).items():
                public[saved] = tensor[:-(-p.numel() // per)]
                if per == 1:
                    public[saved] = public[saved].view(p.shape)
        self.state[p] = public
        return stored

    def _windows(self, p: torch.Tensor, region: RegionStates, group: dict) -> list[Window]:
        """This step's windows over ``p``: one of views where the states are resident fp32,
        else windows of at most window_numel elements over fp32 scratch."""
        names = self.rule.states(group)
        numel, param, grad = p.numel(), p.view(-1), p.grad.reshape(-1)

        def empty_window(scratch=None) -> Window:
            return Window(ShardTensors([], [], {name: [] for name in names}),
                          None if scratch is None else region, scratch=scratch or {})

        if region.kind.in_place:
            window = empty_window()
            window.add(param, grad, 0, {name: region.view(name, 0, numel) for name in names})
            return [window]
        size = window_numel_for(self._window_arg, p.device)
        scratch = {name: self._scratch_for(name, p.device, min(size, region.numel))
                   for name in names}
        windows = []
        for lo in range(0, numel, size):
            hi = min(lo + size, numel)
            window = empty_window(scratch)
            window.add(param[lo:hi], grad[lo:hi], lo, None)
            # decode and encode whole blocks: the last block's padding holds zeros throughout
            window.io[-1][2] = min(size, region.numel - lo)
            windows.append(window)
        return windows

    def _scratch_for(self, name: str, device: torch.device, numel: int) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._scratch or self._scratch[key].numel() < numel:
            self._scratch[key] = torch.zeros(numel, dtype=torch.float32, device=device)
        return self._scratch[key]


def _set_initial_values(rule: UpdateRule, group: dict, windows: list[Window]) -> None:
    """States that do not start at zero (Adagrad's initial accumulator): the same fill as
    ZeroOptimizer's (``zeroopt.shard.initial_fill``)."""
    starts = rule.initial_values(group)
    if starts:  # load: the fresh (zero) padding stays zero
        run(windows, initial_fill(starts), load=True, store=True)


def _refuse_whole_param_rules(rule: UpdateRule, name: str, group: dict) -> None:
    if rule.whole_tensors(group):
        needs = "steps whole matrices (GaLore's and APOLLO's projections, Adafactor's factored " \
                "second moments)"
    elif rule.per_tensor(group):
        needs = "needs statistics of each whole param (LAMB's and LARS' trust ratios, " \
                "cautious masking's per-param count)"
    elif rule.to_eval is not None:
        raise ValueError(f"FusedOptimizer cannot run {name!r}: it evaluates the model at another "
                         "point than it trains, and nothing would call its eval()/train(). Use "
                         "zeroopt.ZeroOptimizer and its eval()/train()")
    else:
        return
    raise ValueError(
        f"FusedOptimizer cannot run {name!r} with these hyperparameters: it {needs}, and "
        "DeepSpeed ZeRO hands its optimizer one flat partition per param group that mixes pieces "
        "of many params. Use an element-wise rule (adamw, lion, sgd, ... and their 8-bit "
        "versions), or zeroopt.ZeroOptimizer, which computes these across its shards (with "
        "DeepSpeed: zeroopt.deepspeed.initialize and a \"zeroopt\" config section)")
