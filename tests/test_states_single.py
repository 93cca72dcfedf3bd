"""8-bit and paged states in one process: against bitsandbytes itself, the paged memory bound,
and the errors bad settings get."""

import copy

import pytest
import torch
from torch import nn

import zeroopt
from zeroopt.states import paging

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def mlp():
    """6,144- and 7,680-element weights (8-bit at bitsandbytes' min_8bit_size 4096), 32-bit
    biases."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 80))


def step_on(model, opt, x, y):
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def bnb_state_as_zeroopt(zero_opt, bnb_opt, params) -> dict:
    """bitsandbytes' AdamW8bit state in zeroopt's saved form: the same codes and absmax, renamed."""
    saved = zero_opt.state_dict()
    for index, p in enumerate(params):
        theirs, ours = bnb_opt.state[p], saved["state"][index]
        ours["step"] = torch.tensor(float(theirs["step"]))
        ours["exp_avg"], ours["exp_avg_sq"] = theirs["state1"], theirs["state2"]
        if theirs["state1"].dtype == torch.uint8:
            ours["exp_avg_absmax"], ours["exp_avg_sq_absmax"] = theirs["absmax1"], theirs["absmax2"]
    return saved


def test_one_step_from_bitsandbytes_state_equals_bitsandbytes():
    """Each step, zeroopt takes bitsandbytes' AdamW8bit state (codes and absmax as they are)
    and both step on the same gradient. The update reads the same dequantized state and runs
    in fp32, so params agree to fp32 rounding (observed 7e-8 relative); the new codes agree but
    where bitsandbytes' CPU search is coarse near 0 (zeroopt rounds to the nearest code
    exactly: tests/test_blockwise.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs = mlp(), mlp()
    zero_opt = zeroopt.ZeroOptimizer(ours.parameters(), "adamw_8bit", **HP)
    bnb_opt = bnb.optim.AdamW8bit(theirs.parameters(), **HP)
    torch.manual_seed(1)
    agreement, distance = [], []
    for t in range(15):
        x, y = torch.randn(32, 64), torch.randn(32, 80)
        if t:
            zero_opt.load_state_dict(bnb_state_as_zeroopt(zero_opt, bnb_opt,
                                                          list(theirs.parameters())))
            with torch.no_grad():
                for p, q in zip(ours.parameters(), theirs.parameters()):
                    p.copy_(q)
        step_on(ours, zero_opt, x, y)
        step_on(theirs, bnb_opt, x, y)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert ((p - q).abs().max() / q.abs().max()).item() < 1e-6
        saved = zero_opt.state_dict()["state"]
        for index, q in enumerate(theirs.parameters()):
            state = bnb_opt.state[q]
            for name, key in (("exp_avg", "state1"), ("exp_avg_sq", "state2")):
                if state[key].dtype != torch.uint8:
                    continue
                codes, bnb_codes = saved[index][name].reshape(-1), state[key].reshape(-1)
                agreement.append((codes == bnb_codes).float().mean().item())
                distance.append((codes.int() - bnb_codes.int()).abs().max().item())
    # Step 1's second moments are tiny (1e-3 g^2), where the map is finest and bitsandbytes'
    # search coarsest: 96% there (up to 7 codes apart); >= 99.5% once the states grow.
    assert sum(agreement) / len(agreement) >= 0.99 and min(agreement) >= 0.95
    assert max(distance) <= 8


def test_8bit_at_least_as_close_to_32bit_as_bitsandbytes():
    """Ten steps without resets: zeroopt's 8-bit AdamW stays as close to torch's 32-bit AdamW
    as bitsandbytes' AdamW8bit does (its nearest-code rounding is never worse)."""
    bnb = pytest.importorskip("bitsandbytes")
    models = [mlp() for _ in range(3)]
    opts = [zeroopt.ZeroOptimizer(models[0].parameters(), "adamw_8bit", **HP),
            bnb.optim.AdamW8bit(models[1].parameters(), **HP),
            torch.optim.AdamW(models[2].parameters(), **HP)]
    torch.manual_seed(2)
    for _ in range(10):
        x, y = torch.randn(32, 64), torch.randn(32, 80)
        for model, opt in zip(models, opts):
            step_on(model, opt, x, y)

    def off(model):
        return max((p - q).abs().max().item()
                   for p, q in zip(model.parameters(), models[2].parameters()))

    assert 0 < off(models[0]) <= 1.05 * off(models[1])


def test_paged_states_stay_within_the_window():
    """A paged CPU shard keeps its states in a mapped file: during a step, what the process has
    resident of that file never exceeds one window of each stored tensor (plus the kernel's
    fault-around: it maps the aligned 64 KiB around each fault); after the step, nothing."""
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # 2.1M params
    window = 16384
    opt = zeroopt.ZeroOptimizer(model.parameters(), "paged_adamw_8bit", window_numel=window)
    region = next(r for r in opt.shard.regions if r.kind.precision == "8bit")
    seen = []
    release = region.release

    def watching_release(lo, numel):
        seen.append(region.resident_bytes())
        release(lo, numel)

    region.release = watching_release
    for _ in range(2):
        step_on(model, opt, torch.randn(8, 512), torch.randn(8, 512))
    # per state: a window of codes and of absmax, each with up to 64 KiB either side
    per_state = window + window // 256 * 4 + 4 * paging.FAULT_AROUND
    bound = 2 * per_state
    assert len(seen) > 100 and max(seen) <= bound, (max(seen), bound)
    assert region.nbytes() > 7 * bound  # the bound is far below the whole state
    assert region.resident_bytes() == 0
    assert opt.device_state_bytes() == 2 * window * 4  # the fp32 windows, nothing else


def test_paged_file_is_gone_and_states_survive_release():
    """Released pages come back with their values (a shared mapping keeps them in the file)."""
    states = paging.MappedFile({"a": (1 << 16, torch.float32)})
    tensor = states.tensors["a"]
    tensor.copy_(torch.arange(1 << 16, dtype=torch.float32))
    states.release(tensor)
    assert states.resident_bytes() == 0
    assert torch.equal(tensor, torch.arange(1 << 16, dtype=torch.float32))


def test_names_and_presets():
    names = set(zeroopt.available_optimizers())
    expected = {"adamw_8bit", "adamw_bnb_8bit", "adamw_torch_8bit", "lion_8bit", "lamb_8bit",
                "lars_8bit", "sgd_8bit", "rmsprop_bnb_8bit", "adagrad_8bit", "ademamix_8bit",
                "paged_adamw_32bit", "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit",
                "paged_ademamix_32bit", "paged_ademamix_8bit"}
    assert expected <= names
    opt = zeroopt.ZeroOptimizer(mlp().parameters(), "paged_lion_8bit", lr=1e-4)
    group = opt.param_groups[0]
    assert (group["state_precision"], group["paged"], opt.rule.name) == ("8bit", True, "lion")
    # the user's own setting wins over the name's preset
    opt = zeroopt.ZeroOptimizer(mlp().parameters(), "adamw_8bit", state_precision="bf16")
    assert opt.param_groups[0]["state_precision"] == "bf16"


def test_param_groups_choose_precision():
    """Embedding-style params kept 32-bit by their own group; the rest 8-bit."""
    model = mlp()
    opt = zeroopt.ZeroOptimizer([{"params": model[0].parameters(), "state_precision": "32bit"},
                                 {"params": model[2].parameters()}], "adamw_8bit")
    state = opt.state_dict()["state"]
    assert state[0]["exp_avg"].dtype == torch.float32  # model[0].weight: its group said 32bit
    assert state[2]["exp_avg"].dtype == torch.uint8  # model[2].weight: 7,680 >= 4096
    assert state[3]["exp_avg"].dtype == torch.float32  # a bias: under min_8bit_size
    # 8-bit moments: 2 bytes per element plus 2 fp32 absmax per 256 (about 2.03 bytes/param)
    assert opt.shard.regions[[b.kind.precision for b in opt.layout.buffers].index("8bit")].nbytes() \
        == 2 * 7680 + 2 * 4 * 7680 // 256


@pytest.mark.parametrize("hp,match", [
    (dict(state_precision="8 bit"), r"Unknown state_precision '8 bit'. Did you mean '8bit'"),
    (dict(state_precision=8), "Unknown state_precision 8"),
    (dict(min_8bit_size=-1), "min_8bit_size must be a non-negative int"),
    (dict(paged="yes"), "paged must be True or False"),
    (dict(window_numel=1000), "window_numel must be a positive multiple of 256"),
    (dict(state_precisoin="8bit"), "Did you mean 'state_precision'"),
])
def test_bad_settings_are_named(hp, match):
    with pytest.raises((ValueError, TypeError), match=match):
        zeroopt.ZeroOptimizer(mlp().parameters(), "adamw", **hp)


def test_rules_that_cannot_take_8bit_say_why():
    with pytest.raises(ValueError, match=r"schedule_free_adamw keeps \['z'\] in 32-bit"):
        zeroopt.ZeroOptimizer(mlp().parameters(), "schedule_free_adamw", state_precision="8bit")
    with pytest.raises(ValueError, match="set momentum > 0"):
        zeroopt.ZeroOptimizer(mlp().parameters(), "sgd_8bit", momentum=0.0)


def test_corrupt_8bit_state_is_named():
    model = mlp()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw_8bit")
    step_on(model, opt, torch.randn(4, 64), torch.randn(4, 80))
    saved = opt.state_dict()
    broken = copy.deepcopy(saved)
    del broken["state"][0]["exp_avg_absmax"]
    with pytest.raises(ValueError, match="param 0's 'exp_avg': 8-bit codes without "
                                         "'exp_avg_absmax'"):
        opt.load_state_dict(broken)
    broken = copy.deepcopy(saved)
    broken["state"][0]["exp_avg_sq_absmax"] = broken["state"][0]["exp_avg_sq_absmax"][:-1]
    with pytest.raises(ValueError, match="'exp_avg_sq_absmax' has 23 entries, the param has 24"):
        opt.load_state_dict(broken)
    opt.load_state_dict(saved)  # the intact one still loads
