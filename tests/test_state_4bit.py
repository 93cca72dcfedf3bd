"""4-bit states in torchao's format (``state_precision="4bit"``, ``adamw_torch_4bit``).

The codec (``zeroopt/states/fourbit.py``) is held to torchao's own ``OptimState4bit``: the same
maps, codes, scales and decoded values, bit for bit.

Training is held, at W = 1, 2, 3, to torchao's ``AdamW4bit`` run unsharded on the exact
average of every rank's gradient (tests/ranks/state_4bit.py), next to torch.optim's AdamW with
32-bit states, which measures what 4-bit states change at all (observed: 17% to 30% of each
quantized weight's largest magnitude after 6 steps of lr 1e-2). Two cases:

- hyperparameters exact in fp32 (lr 2^-7, weight decay 2^-3, betas 0.5 and 0.75; blocks of
  128, torchao's default): torchao's fp32 arithmetic for lr * weight_decay and 1 - beta^t is
  then exact, like zeroopt's fp64, and what is left between the two is the update's rounding
  (lerp against torch's fused kernel). No code ever lands on the other side of a rounding
  boundary, so params and states agree to ulps: tolerance 1e-6 relative to each param's (or
  state's) largest magnitude, as test_equivalence.py's (observed: 2.5e-7 params, 3.6e-7
  states).
- Transformers' ``adamw_torch_4bit`` (blocks of 256, betas 0.9 and 0.999, lr 1e-2): torchao
  computes 1 - 0.999^t in fp32 (1.3e-5 relative error at t = 1), so its updates differ from
  zeroopt's (and torch.optim's) by ~6e-6 relative; the params then differ by ulps, and a 4-bit
  code sitting at a rounding boundary can flip, which moves that element's step by up to 40%
  of lr (a step of the 1/16 map of v). So the difference is held to half of what 4-bit states
  change (observed at most 0.24 of it); states stored 8-bit or 32-bit, or the wrong map or
  block, give 1 or more.

Sharding itself is held to bit identity: a run where every rank sees the same batch gives the
same params at W = 1, 2, 3 (4-bit blocks belong to one param and one rank at every world size),
paged states stepped through small windows equal resident ones, and a checkpoint saved at W = 3
resumes at W = 2 to exactly the uninterrupted run: through DCP, through a state dict, and
through a 32-bit optimizer's state dict (4-bit states are saved as their decoded values, which
load back into 4-bit bit for bit: ``fourbit.quantize_exact``).
"""

import pytest
import torch

from distributed import run_ranks
from ranks import state_4bit
from zeroopt.states import fourbit

subclass_4bit = pytest.importorskip("torchao.optim.subclass_4bit")

TOL = 1e-6  # see the module docstring
FRACTION_OF_4BIT_EFFECT = 0.5  # see the module docstring
WORLD_SIZES = (1, 2, 3)
DYADIC, TRANSFORMERS = "adamw_4bit_block128_dyadic", "adamw_torch_4bit"


# --- the codec, against torchao's OptimState4bit ------------------------------------------------


def test_code_maps_are_torchaos():
    assert fourbit.code_map(True).tolist() == list(subclass_4bit.get_qmap_signed())
    assert fourbit.code_map(False).tolist() == list(subclass_4bit.get_qmap_unsigned())


def hard_values(signed: bool, block: int, seed: int = 0) -> torch.Tensor:
    """Blocks of every sort: magnitudes over 8 decades, exact code values and exact midpoints
    between codes (ties) times the scale, a block of zeros, and blocks whose largest magnitude
    is negative (torchao's signed map has no -1)."""
    g = torch.Generator().manual_seed(seed)
    n = block * 24
    x = torch.randn(n, generator=g) * torch.logspace(-6, 2, n)[torch.randperm(n, generator=g)]
    code = fourbit.code_map(signed)
    ties = torch.cat([code, (code[1:] + code[:-1]) / 2])
    blocks = x.view(-1, block)
    picked = ties[torch.randint(len(ties), (8, block), generator=g)]
    blocks[:8] = picked * 3.0
    blocks[:8, 0] = 3.0  # the scale: code values and midpoints stay exact after dividing
    blocks[8] = 0
    if signed:
        blocks[9:12] = -blocks[9:12].abs()  # largest magnitude negative
    else:
        x.abs_()
    return x


@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_code_lookup_is_torchaos_search_at_every_edge(signed):
    """fourbit's codes come from a table of fp32 ranges and thresholds (``_tables``); torchao
    searches the map. Held to torchao's quantize_4bit_with_qmap at both ends of every range of
    fp32 values sharing their top 16 bits, and at 8 ulps either side of every threshold."""
    from torchao.optim.quant_utils import quantize_4bit_with_qmap

    prefixes = torch.arange(1 << 16, dtype=torch.int64) << 16
    ends = torch.cat([prefixes, prefixes | 0xFFFF])
    ends = torch.where(ends < 1 << 31, ends, ends - (1 << 32)).to(torch.int32).view(torch.float32)
    _, thresholds = fourbit._tables(signed, torch.device("cpu"))
    near = [thresholds[:15]]
    for direction in (float("inf"), float("-inf")):
        at = thresholds[:15]
        for _ in range(8):
            at = torch.nextafter(at, torch.full_like(at, direction))
            near.append(at)
    values = torch.cat([ends[ends.isfinite()], *near])
    theirs = quantize_4bit_with_qmap(values, fourbit.code_map(signed))
    assert torch.equal(fourbit._codes(values, signed), theirs.long())


@pytest.mark.parametrize("block", (128, 256))
@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_codes_scales_and_values_are_torchaos(signed, block):
    x = hard_values(signed, block)
    theirs = subclass_4bit.OptimState4bit.zeros(x.numel(), signed, block)
    theirs.copy_(x)
    codes, scale = fourbit.quantize(x, signed, block)
    assert torch.equal(codes, theirs.codes)
    assert torch.equal(scale, theirs.scale)
    assert torch.equal(fourbit.dequantize(codes, scale, signed), theirs.dequantize())
    # into given tensors (as the states' storage does) too
    into = (torch.empty_like(codes), torch.empty_like(scale))
    fourbit.quantize(x, signed, block, *into)
    assert torch.equal(into[0], codes) and torch.equal(into[1], scale)


def test_a_fresh_state_is_torchaos_zeros():
    theirs = subclass_4bit.OptimState4bit.zeros(512, True, 128)
    codes, scale = fourbit.quantize_exact(torch.zeros(512), True, 128)
    assert torch.equal(codes, theirs.codes) and torch.equal(scale, theirs.scale)
    assert not fourbit.dequantize(codes, scale, False).any()


@pytest.mark.parametrize("block", (128, 256))
@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_saved_values_load_back_bit_for_bit(signed, block):
    """Decoded 4-bit values encode back to codes and scales that decode to the same values.
    Plain requantizing would not: a signed block whose largest magnitude is negative decodes
    to 0.8875 of its scale, and its scale would shrink."""
    x = hard_values(signed, block, seed=1)
    decoded = fourbit.dequantize(*fourbit.quantize(x, signed, block), signed)
    again = fourbit.dequantize(*fourbit.quantize_exact(decoded, signed, block), signed)
    assert torch.equal(again, decoded)
    if signed:
        plain = fourbit.dequantize(*fourbit.quantize(decoded, signed, block), signed)
        assert not torch.equal(plain, decoded)
    # values that are not 4-bit values are quantized as torchao quantizes them
    x = torch.randn(block * 16, generator=torch.Generator().manual_seed(2))
    x = x if signed else x.abs()
    assert all(torch.equal(a, b) for a, b in zip(fourbit.quantize_exact(x, signed, block),
                                                 fourbit.quantize(x, signed, block)))


# --- training, sharded, against torchao's AdamW4bit ------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every rank's results at W = 1, 3 and 2, in that order: W = 3 saves the checkpoints that
    W = 2 resumes."""
    root = str(tmp_path_factory.mktemp("state_4bit"))
    return {w: run_ranks(w, state_4bit.suite, root, shared=True) for w in (1, 3, 2)}


@pytest.fixture(scope="module")
def references():
    """torchao's AdamW4bit and torch.optim's AdamW, unsharded, per (case, world size)."""
    return {(case, w): state_4bit.references(case, w)
            for case in state_4bit.CASES for w in WORLD_SIZES}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(state_4bit.CASES))
def test_4bit_where_torchao_quantizes(runs, references, case):
    """4-bit states for the params of at least 4096 elements in whole blocks, with torchao's
    block, 32-bit for the rest (a 4,107-element weight, the small params), as torchao picks."""
    block = state_4bit.CASES[case][2]
    for w in WORLD_SIZES:
        theirs = {n for (n, _), (_, quantized) in references[case, w]["states"].items()
                  if quantized}
        assert theirs == set(state_4bit.QUANTIZED)
        for r in runs[w]:
            assert r[case]["kinds"] == {
                n: ("4bit", block) if n in state_4bit.QUANTIZED else ("32bit", None)
                for n in r[case]["kinds"]}


@pytest.mark.parametrize("w", WORLD_SIZES, ids=lambda w: f"W{w}")
def test_exact_hyperparameters_match_torchao_to_ulps(runs, references, w):
    ref = references[DYADIC, w]
    for r in runs[w]:
        for n, ours in r[DYADIC]["params"].items():
            assert rel(ours, ref["torchao"][n]) <= TOL, n
            # and 4-bit states changed the run (else this compared nothing 4-bit)
            if n in state_4bit.QUANTIZED:
                assert rel(ref["adamw32"][n], ref["torchao"][n]) > 1e-2, n
        for key, ours in r[DYADIC]["states"].items():
            theirs, _ = ref["states"][key]
            assert rel(ours.float(), theirs) <= TOL, key


@pytest.mark.parametrize("w", WORLD_SIZES, ids=lambda w: f"W{w}")
def test_transformers_defaults_stay_near_torchao(runs, references, w):
    ref = references[TRANSFORMERS, w]
    for r in runs[w]:
        for n, ours in r[TRANSFORMERS]["params"].items():
            effect = rel(ref["adamw32"][n], ref["torchao"][n])
            assert rel(ours, ref["torchao"][n]) <= FRACTION_OF_4BIT_EFFECT * effect, n


@pytest.mark.parametrize("w", WORLD_SIZES, ids=lambda w: f"W{w}")
def test_paged_windows_step_as_resident_states(runs, w):
    assert all(r["paged"] for r in runs[w])


def test_same_batches_give_the_same_params_at_every_world_size(runs):
    first = runs[1][0]["uninterrupted"]
    for w in WORLD_SIZES:
        for r in runs[w]:
            assert all(torch.equal(r["uninterrupted"][n], first[n]) for n in first), w


@pytest.mark.parametrize("how", ("dcp", "state_dict", "via_32bit"))
def test_checkpoint_saved_at_3_resumes_at_2_bit_identically(runs, how):
    uninterrupted = runs[3][0]["uninterrupted"]
    for r in runs[2]:
        resumed = r["resumed"][how]
        assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted), how


def test_4bit_states_load_into_32bit_as_their_values(runs):
    saved = runs[3][0]["saved"]["state"]
    for r in runs[2]:
        assert r["resumed"]["kinds_32"] == ["32bit"]
        for index, entry in saved.items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(r["resumed"]["state_32"][index][name], entry[name])


def test_4bit_states_load_into_8bit(runs):
    """Within 8-bit's own rounding: half the dynamic map's widest step (0.9 / 64 near 1), so
    at most 0.0070 of the block's absmax, itself at most the state's largest value; tolerance
    0.0075 of that (observed 0.0070: some value landed mid-step)."""
    saved = runs[3][0]["saved"]["state"]
    for r in runs[2]:
        assert r["resumed"]["kinds_8"] == ["32bit", "8bit"] and r["resumed"]["8bit_stepped"]
        for index, entry in saved.items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert rel(r["resumed"]["state_8"][index][name], entry[name]) <= 0.0075


# --- FusedOptimizer (DeepSpeed's partitions): unsharded, its states published live ------------


def test_fused_optimizer_matches_torchao_and_saves_its_4bit_states():
    """FusedOptimizer steps a 8,192-element partition in 4-bit as torchao does (the exact-in-fp32
    hyperparameters: tolerance 1e-6, as above), and its state_dict holds the states' current
    values (its published tensors are kept current), which resume bit for bit."""
    import zeroopt

    hp = dict(state_4bit.DYADIC_HP)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(8192, generator=g) for _ in range(8)]
    ours, theirs = (torch.nn.Parameter(torch.randn(8192, generator=g)) for _ in range(2))
    theirs.data.copy_(ours.data)
    opt = zeroopt.FusedOptimizer([ours], "adamw", state_precision="4bit", window_numel=2048, **hp)
    ref = importorskip_adamw4bit()([theirs], **hp)
    for grad in grads[:6]:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        with state_4bit.eager_torchao():
            ref.step()
    assert rel(ours.detach(), theirs.detach()) <= TOL
    saved = opt.state_dict()
    for name in ("exp_avg", "exp_avg_sq"):
        assert rel(saved["state"][0][name], ref.state[theirs][name].dequantize()) <= TOL
    resumed = torch.nn.Parameter(ours.detach().clone())
    again = zeroopt.FusedOptimizer([resumed], "adamw", state_precision="4bit", **hp)
    again.load_state_dict(saved)
    for grad in grads[6:]:
        ours.grad, resumed.grad = grad.clone(), grad.clone()
        opt.step()
        again.step()
    assert torch.equal(ours, resumed)


def importorskip_adamw4bit():
    return pytest.importorskip("torchao.optim").AdamW4bit
