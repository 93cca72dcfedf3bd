"""Bad input gets an error that names the cause and the fix."""

import contextlib
import errno
import re
import subprocess

import pytest
import torch

from ranks import bad_input
import zeroopt
from distributed import run_ranks


def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_unknown_optimizer_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamww'\. Did you mean 'adamw'\?"):
        zeroopt.ZeroOptimizer(model().parameters(), "adamww")
    with pytest.raises(ValueError, match="Available: .*adamw, .*lion"):
        zeroopt.ZeroOptimizer(model().parameters(), "shampoo")


def test_unknown_hyperparameter_suggests_the_closest_name():
    with pytest.raises(TypeError, match=r"unexpected hyperparameter 'beta'\. Did you mean 'betas'"):
        zeroopt.ZeroOptimizer(model().parameters(), "adamw", beta=(0.9, 0.99))


@pytest.mark.parametrize("name", sorted(set(zeroopt.algorithms.ELSEWHERE)
                                        - set(zeroopt.available_optimizers())))
def test_an_optimizer_zeroopt_has_no_rule_for_says_where_it_lives(name):
    """Not "Did you mean" a registered name spelt alike ("adan" -> "adam", "muon" -> "lion",
    "radam" -> "adam" are other optimizers)."""
    with pytest.raises(ValueError) as caught:
        zeroopt.ZeroOptimizer(model().parameters(), name)
    message = str(caught.value)
    assert message.startswith(f"Unknown optimizer {name!r}: zeroopt has no rule for it ("
                              f"{zeroopt.algorithms.ELSEWHERE[name]}). Available: adafactor, ")
    assert "Did you mean" not in message


@pytest.mark.parametrize("typo, meant", [
    ("adamw8bit", "adamw_8bit"), ("sdg", "sgd"), ("lamp", "lamb"), ("LION", None),
    ("paged_adamw_8bt", "paged_adamw_8bit"), ("ademamix_8bit_paged", None),
    ("adamw_4bit", None), ("lion_16bit", None), ("adam_mini", None)])
def test_did_you_mean_only_for_a_typo(typo, meant):
    """Within two edits (one for names of up to four letters), with the same numbers: 4-bit is
    not a misspelt 8-bit, nor Adam-mini a misspelt adamw_8bit (difflib's 0.5 cutoff said so)."""
    if meant is None and typo.lower() in zeroopt.available_optimizers():
        zeroopt.ZeroOptimizer(model().parameters(), typo)  # names are case-insensitive
        return
    with pytest.raises(ValueError) as caught:
        zeroopt.ZeroOptimizer(model().parameters(), typo)
    hint = re.search(r"Did you mean '(\w+)'\?", str(caught.value))
    assert (hint and hint.group(1)) == (meant or None), str(caught.value)[:120]


@pytest.mark.parametrize("word, choices, meant", [
    ("stgae", ["stage", "shard_size"], "stage"),  # neighbours swapped
    ("momentun", ["lr", "momentum"], "momentum"),
    ("lrr", ["lr", "eps"], "lr"),
    ("wd", ["lr", "eps"], None),  # two edits in a two-letter word is another word
    ("muon", ["lion", "lamb"], None),
    ("lr_decay", ["weight_decay", "lr"], None),  # difflib's 0.5: weight_decay
    ("fp31", ["fp32", "bf16"], None),  # both with numbers, not the same numbers
    ("beta1", ["betas", "eps"], "betas"),  # numbers in one only: a typo still
])
def test_closest_name(word, choices, meant):
    from zeroopt.validation import closest_name

    assert closest_name(word, choices) == meant


@pytest.mark.parametrize("rule", [r.name for r in zeroopt.algorithms.registered_rules()])
def test_a_hyperparameter_of_other_rules_is_refused_naming_them(rule):
    """Every other rule's hyperparameter or group key, given to this rule as a keyword: a
    TypeError that lists what the rule takes and names the rules that take the key."""
    from zeroopt.states.kinds import STATE_DEFAULTS

    this = zeroopt.algorithms.get_rule(rule)
    takes = list({**STATE_DEFAULTS, **this.defaults})
    rules = zeroopt.algorithms.registered_rules()
    foreign = {key for r in rules for key in (*r.defaults, *r.group_keys)} - set(takes)
    for key in sorted(foreign):
        with pytest.raises(TypeError) as caught:
            zeroopt.ZeroOptimizer(model().parameters(), rule, **{key: 1})
        message = str(caught.value)
        assert f"{rule} got an unexpected hyperparameter {key!r}" in message
        assert f"It takes: {', '.join(takes)}." in message, message
        if key in this.group_keys:
            assert f"{key!r} is a key of {rule}'s param groups: give it in the group" in message
            continue
        owners = [r.name for r in rules if key in r.defaults or key in r.group_keys]
        assert f" {key!r} is a " in message and message.endswith(f", not of {rule}."), message
        assert all(owner in message.split(f" {key!r} is a ")[1] for owner in owners), message


@pytest.mark.parametrize("rule, group, owners", [
    ("adamw", dict(rank=4, update_proj_gap=10), "a param-group key of galore_adamw, "
                                                "galore_adamw_8bit, apollo_adamw and adafactor"),
    ("adamw", dict(momentum=0.9), "a hyperparameter of sgd, nesterov, "),
    ("lamb", dict(momentum=0.9), "a hyperparameter of sgd, nesterov, "),
    ("sgd", dict(betas=(0.9, 0.99)), "a hyperparameter of adamw, adam, lion, "),
    ("lion", dict(update_proj_gap=10), "a param-group key of galore_adamw, "),
])
def test_a_group_key_of_other_rules_is_refused_naming_them(rule, group, owners):
    m = model()
    key = next(iter(group))
    with pytest.raises(TypeError, match=rf"param group 1 has an unknown key '{key}'\. A param "
                                        rf"group of {rule} takes: params, .*\. '{key}' is "
                                        rf"{owners}.*, not of {rule}\.$"):
        zeroopt.ZeroOptimizer([{"params": m[0].parameters()},
                               {"params": m[1].parameters(), **group}], rule)


@pytest.mark.parametrize("name, hp, message", [
    ("adamw", dict(lr=-1e-3), r"Invalid lr: -0.001 \(it must be >= 0\)"),
    ("adamw", dict(betas=(0.9, 1.0)), r"Invalid beta at index 1: 1.0 \(each beta must be in \[0, 1\)\)"),
    ("adamw", dict(betas=(0.9,)), r"betas must be a tuple of 2 numbers"),
    ("adam", dict(eps=-1.0), r"Invalid eps"),
    ("adamw", dict(weight_decay=-0.1), r"Invalid weight_decay"),
    ("adamw", dict(amsgrad=True), r"amsgrad=True is not supported by zeroopt; use amsgrad=False"),
    ("sgd", dict(momentum=-0.5), r"Invalid momentum"),
    ("sgd", dict(nesterov=True), r"Nesterov momentum requires momentum > 0 and dampening = 0"),
    ("lion", dict(betas=(-0.1, 0.99)), r"Invalid beta at index 0"),
    ("lion", dict(lr=float("nan")), r"lr must be a number"),
])
def test_invalid_hyperparameters(name, hp, message):
    with pytest.raises(ValueError, match=message):
        zeroopt.ZeroOptimizer(model().parameters(), name, **hp)


def test_invalid_hyperparameter_in_a_param_group():
    m = model()
    groups = [{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": -1.0}]
    with pytest.raises(ValueError, match="Invalid lr: -1.0"):
        zeroopt.ZeroOptimizer(groups, "adamw")


def test_invalid_stage_and_options():
    with pytest.raises(ValueError, match=r"stage must be 1 .* or 2 .*, got 3"):
        zeroopt.ZeroOptimizer(model().parameters(), stage=3)
    with pytest.raises(ValueError, match="average_grads=False .* works with stage=1 only"):
        zeroopt.ZeroOptimizer(model().parameters(), stage=2, average_grads=False)
    with pytest.raises(ValueError, match="grad_compression .* average_grads=False"):
        zeroopt.ZeroOptimizer(model().parameters(), grad_compression="int8", average_grads=False)
    with pytest.raises(ValueError, match="no trainable params"):
        zeroopt.ZeroOptimizer(model().requires_grad_(False).parameters())


def test_step_before_backward_changes_nothing_and_says_why(caplog):
    """As torch.optim: no gradient, no update; the warning names the likely mistake."""
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = zeroopt.ZeroOptimizer(m.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert "found no gradient on any rank" in caplog.text
    assert "Call loss.backward() before step()" in caplog.text


def test_add_param_group_after_construction():
    m = model()
    opt = zeroopt.ZeroOptimizer(m[0].parameters())
    with pytest.raises(RuntimeError, match="cannot add a param group after construction"):
        opt.add_param_group({"params": m[1].parameters()})


def test_wrap_rejects_what_it_cannot_map():
    with pytest.raises(TypeError, match=r"cannot map torch.optim.adamax.Adamax.*available_optimizers"):
        zeroopt.wrap(torch.optim.Adamax(model().parameters()))
    m = model()
    stepped = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    stepped.step()
    with pytest.raises(ValueError, match="has not stepped yet"):
        zeroopt.wrap(stepped)


def test_wrap_maps_torch_adam_with_decoupled_weight_decay_to_adamw():
    opt = zeroopt.wrap(torch.optim.Adam(model().parameters(), lr=0.1, decoupled_weight_decay=True,
                                        weight_decay=0.2))
    assert opt.rule.name == "adamw" and opt.param_groups[0]["weight_decay"] == 0.2


def test_load_state_dict_mismatches():
    m = model()
    opt = zeroopt.ZeroOptimizer(m.parameters(), "adamw")
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    lion = zeroopt.ZeroOptimizer(model().parameters(), "lion")
    with pytest.raises(ValueError, match="saved by optimizer 'adamw', and this one is 'lion'"):
        lion.load_state_dict(saved)
    fewer = zeroopt.ZeroOptimizer(model()[0].parameters(), "adamw")
    with pytest.raises(ValueError, match="param group 0 has 4 params there and 2 here"):
        fewer.load_state_dict(saved)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r"param 2's 'exp_avg' has shape \[2, 3\], the param has shape \[5, 3\]"):
        zeroopt.ZeroOptimizer(other.parameters(), "adamw").load_state_dict(saved)
    del saved["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match="param 1 has no 'exp_avg_sq'"):
        zeroopt.ZeroOptimizer(model().parameters(), "adamw").load_state_dict(saved)
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        opt.load_state_dict({"weights": 1})


def test_load_state_dict_from_torch_optim():
    """torch.optim.AdamW's own state dict loads, and both continue identically."""
    torch.manual_seed(0)
    a = model()
    b = torch.nn.Sequential(*[torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)])
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(a.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    a(x).square().sum().backward()
    ref.step()
    ref.zero_grad()
    b.load_state_dict(a.state_dict())
    opt = zeroopt.ZeroOptimizer(b.parameters(), "adamw", lr=0.1)
    opt.load_state_dict(ref.state_dict())
    for m, o in ((a, ref), (b, opt)):
        m(x).square().sum().backward()
        o.step()
        o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind, message", [
    ("shape", r"param 2 is shape \[41\] float32 in group 0 on rank 0 but shape \[29, 40\] float32 in group 0 on rank 1"),
    ("count", r"rank 0 has 9 params, rank 1 has 8"),
    ("dtype", r"param 0 is shape \[\] float32 in group 0 on rank 0 but shape \[\] float64"),
])
def test_ranks_that_disagree_about_params_all_get_the_error(kind, message):
    errors = run_ranks(2, bad_input.mismatched_params, kind, shared=True)
    for error in errors:
        assert "ranks disagree about the parameters" in error
        assert re.search(message, error), error


def test_ranks_that_disagree_about_settings_all_get_the_error():
    for error in run_ranks(2, bad_input.mismatched_settings, shared=True):
        assert "ranks disagree about stage: rank 0 has 1, rank 1 has 2" in error


def test_a_param_belongs_to_the_newest_optimizer_built_over_it():
    """A notebook cell run twice: no gc needed, the newest takes the gradients, and the old
    one refuses to step, naming what happened."""
    m = model()
    first = zeroopt.ZeroOptimizer(m.parameters())
    second = zeroopt.ZeroOptimizer(m.parameters(), "sgd", lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.randn(2, 4)).sum().backward()
    second.step()
    assert not any(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    with pytest.raises(RuntimeError, match="a newer ZeroOptimizer, built over the same params, "
                                           "has taken over"):
        first.step()


def test_step_with_closure_returns_the_loss():
    m = model()
    opt = zeroopt.ZeroOptimizer(m.parameters(), "sgd", lr=0.1)
    x = torch.randn(3, 4)

    def closure():
        opt.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert opt.step(closure) < first


def test_loading_hyperparameters_that_need_an_unallocated_state():
    m = model()
    with_momentum = zeroopt.ZeroOptimizer(m.parameters(), "sgd", lr=0.1, momentum=0.9)
    m(torch.randn(2, 4)).sum().backward()
    with_momentum.step()
    saved = with_momentum.state_dict()
    plain = zeroopt.ZeroOptimizer(model().parameters(), "sgd", lr=0.1)
    assert plain.state_bytes() == 0  # plain SGD keeps no state
    with pytest.raises(ValueError, match=r"need the states \['momentum_buffer'\], which this optimizer was built without"):
        plain.load_state_dict(saved)


@pytest.mark.parametrize("name, hp, message", [
    ("lion", dict(adopt=True), r"adopt=True is an Adam option; Lion's update is a sign already"),
    ("lion", dict(grams=True), r"grams=True is an Adam option"),
    ("adamw", dict(cautious=1), r"cautious must be True or False, got 1"),
    ("lamb", dict(weight_decay=-1.0), r"Invalid weight_decay"),
    ("lars", dict(eta=-1.0), r"Invalid eta"),
    ("ademamix", dict(betas=(0.9, 0.999)), r"betas must be a tuple of 3 numbers"),
    ("ademamix", dict(alpha_warmup=0), r"alpha_warmup must be None or a positive number of steps"),
    ("rmsprop", dict(alpha=-0.1), r"Invalid alpha"),
    ("adagrad", dict(lr_decay=-0.1), r"Invalid lr_decay"),
])
def test_invalid_options_of_the_other_rules(name, hp, message):
    # In a param group, so that the rule's own check speaks (as a keyword, an option the rule
    # does not take is an unexpected hyperparameter).
    with pytest.raises(ValueError, match=message):
        zeroopt.ZeroOptimizer([{"params": model().parameters(), **hp}], name)


def test_a_model_moved_after_the_optimizer_was_built_is_an_error():
    model = torch.nn.Linear(8, 4)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw")
    model.to(torch.float64)  # new storage: the optimizer's updates would no longer reach it
    model(torch.ones(2, 8, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"moved or cast \(model.to\(...\)\) after the "
                                           "optimizer was built"):
        opt.step()


# -- ranks that disagree: every rank gets the same error, at W = 2 and 3 ---------------------

DISAGREEMENTS = {  # case (tests/ranks/bad_input.py) -> the error, {last}: the rank that differs
    "state_precision": "RuntimeError: zeroopt: ranks disagree about param group 1's "
                       "'state_precision': rank 0 has '32bit', rank {last} has '8bit'",
    "min_8bit_size": "RuntimeError: zeroopt: ranks disagree about param group 1's "
                     "'min_8bit_size': rank 0 has 4096, rank {last} has 16",
    "galore_rank": "RuntimeError: zeroopt: ranks disagree about param group 1's 'rank': "
                   "rank 0 has no such key, rank {last} has 4",
    "skip_nonfinite": "RuntimeError: zeroopt: ranks disagree about skip_nonfinite: rank 0 has "
                      "True, rank {last} has False",
    "lr": "RuntimeError: zeroopt: ranks disagree about param group 1's 'lr': rank 0 has 0.001, "
          "rank {last} has 0.002",
    "betas": "RuntimeError: zeroopt: ranks disagree about param group 0's 'betas': rank 0 has "
             "(0.9, 0.999), rank {last} has (0.9, 0.99)",
    "weight_decay": "RuntimeError: zeroopt: ranks disagree about param group 0's "
                    "'weight_decay': rank 0 has 0.0, rank {last} has 0.1",
    "order": "RuntimeError: zeroopt: ranks disagree about the parameters: param 0 is "
             "'0.weight' shape [64, 64] float32 in group 0 on rank 0 but '1.weight' shape "
             "[64, 64] float32 in group 0 on rank {last}",
    "invalid_lr": "ValueError: zeroopt: on rank {last}: Invalid lr: -1.0 (it must be >= 0)",
    "page_dir": "ValueError: zeroopt: on rank {last}: page_dir '{page_dir}/missing' does not "
                "exist: create it",
}


@pytest.fixture(scope="module", params=[2, 3], ids=["W2", "W3"])
def disagreement_errors(request, tmp_path_factory):
    """Every case's error on every rank, from one job per world size (the cases run one after
    another: each raises on every rank after the same collective)."""
    page_dir = str(tmp_path_factory.mktemp("pages"))
    errors = run_ranks(request.param, bad_input.disagreements, list(DISAGREEMENTS),
                       page_dir, shared=True)
    return request.param, page_dir, errors


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_ranks_that_disagree_all_get_the_same_error(disagreement_errors, case):
    world_size, page_dir, errors = disagreement_errors
    messages = [rank_errors[case] for rank_errors in errors]
    assert len(set(messages)) == 1, messages  # the same error on every rank
    assert DISAGREEMENTS[case].format(last=world_size - 1, page_dir=page_dir) in messages[0], \
        messages[0]


def test_a_disagreement_seen_by_one_sharding_group_reaches_every_rank():
    errors = run_ranks(4, bad_input.disagreement_in_one_sharding_group, shared=True)
    assert len(set(errors)) == 1, errors
    assert "ranks disagree about bucket_numel: rank 2 has 700, rank 3 has 800" in errors[0], \
        errors[0]


# -- bad input, refused at construction with the cause and the fix ---------------------------

def test_complex_params_are_refused():
    m = model()
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"param 4 of group 0 is complex \(complex64, shape "
                                         r"\[3\]\): torch.optim steps complex params as pairs of "
                                         r"reals \(torch.view_as_real\), and zeroopt does not yet"):
        zeroopt.ZeroOptimizer([*m.parameters(), z])
    with pytest.raises(ValueError, match=r"store torch.view_as_real\(w\) as the Parameter.* or "
                                         r"give the complex params to a plain torch.optim"):
        zeroopt.ZeroOptimizer([("z", z)])


@pytest.mark.parametrize("how", ["one group", "two groups", "named"])
def test_a_tensor_given_twice_is_refused(how):
    m = model()
    w = m[0].weight
    params = {"one group": [w, m[0].bias, w],
              "two groups": [{"params": [w]}, {"params": m[0].parameters()}],
              "named": [("first", w), ("second", w)]}[how]
    where = {"one group": "param 0 of group 0 and as param 2 of group 0",
             "two groups": "param 0 of group 0 and as param 0 of group 1",
             "named": "'first' \\(param 0 of group 0\\) and as 'second' \\(param 1 of group 0\\)"}
    with pytest.raises(ValueError, match=r"the same tensor \(shape \[3, 4\]\) is given twice: "
                                         rf"as {where[how]}\. Give each param once"):
        zeroopt.ZeroOptimizer(params)


def test_params_on_the_meta_device_are_refused():
    with torch.device("meta"):
        m = model()
    with pytest.raises(ValueError, match=r"param 0 of group 0 is on the meta device .*Materialize "
                                         r"the model first, e.g. model.to_empty\(device='cpu'\)"):
        zeroopt.ZeroOptimizer(m.parameters())


@pytest.mark.parametrize("group, message", [
    ({"lrr": 0.1}, r"param group 1 has an unknown key 'lrr'\. Did you mean 'lr'\? A param group "
                   r"of adamw takes: params, param_names, initial_lr, lr, betas"),
    ({"rank": 4}, r"param group 1 has an unknown key 'rank'\. A param group of adamw takes"),
    ({"state_precison": "8bit"}, r"unknown key 'state_precison'\. Did you mean "
                                 r"'state_precision'\?"),
])
def test_an_unknown_key_in_a_param_group_is_refused(group, message):
    m = model()
    with pytest.raises(TypeError, match=message):
        zeroopt.ZeroOptimizer([{"params": m[0].parameters()},
                               {"params": m[1].parameters(), **group}], "adamw")


def test_the_keys_a_param_group_may_carry_are_accepted():
    """torch's named params, LR schedulers' initial_lr, and the rules' own group keys."""
    m = model()
    zeroopt.ZeroOptimizer([{"params": list(m[0].named_parameters()), "initial_lr": 0.1},
                           {"params": list(m[1].named_parameters()), "weight_decay": 0.0}])
    projected = dict(rank=2, update_proj_gap=10, scale=0.25, proj_type="std")
    for name, extra in (("galore_adamw", {}), ("galore_adamw_8bit", {}),
                        ("galore_adafactor", {}),
                        ("apollo_adamw", dict(proj="random", scale_type="tensor"))):
        m = model()
        opt = zeroopt.ZeroOptimizer([{"params": [m[0].bias, m[1].bias]},
                                     {"params": [m[0].weight, m[1].weight], **projected,
                                      **extra}], name, lr=1e-3)
        assert opt.param_groups[1]["rank"] == 2


@pytest.mark.parametrize("option, value, message", [
    ("bucket_numel", 4e6, r"bucket_numel must be an int, got 4000000.0 \(float\): write "
                          r"4_000_000 \(an int\)"),
    ("bucket_numel", True, r"bucket_numel must be an int, got True \(bool\)"),
    ("stage", "2", r"stage must be an int, got '2' \(str\): use stage=1 or stage=2"),
    ("stage", True, r"stage must be an int, got True \(bool\)"),
    ("window_numel", 4e6, r"window_numel must be an int, got 4000000.0 \(float\)"),
])
def test_size_options_must_be_ints(option, value, message):
    with pytest.raises(TypeError, match=message):
        zeroopt.ZeroOptimizer(model().parameters(), **{option: value})


@contextlib.contextmanager
def _tmpfs(path, options: str):
    """A tmpfs mounted at ``path`` (root, and a kernel that lets this process mount)."""
    path.mkdir(exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): "
                    f"{mount.stderr.strip()}")
    try:
        yield path
    finally:  # lazy: detached even if a failed test left a mapping of it open
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_page_dir_that_does_not_exist_or_is_not_writable(tmp_path):
    params = [torch.nn.Parameter(torch.randn(300))]
    with pytest.raises(ValueError, match=r"page_dir '.*/nowhere' does not exist: create it "
                                         r"\(os.makedirs\)"):
        zeroopt.ZeroOptimizer(params, "paged_adamw_32bit", page_dir=str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"page_dir '.*/file' is not a directory"):
        zeroopt.ZeroOptimizer(params, "paged_adamw_32bit", page_dir=str(tmp_path / "file"))
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        with pytest.raises(ValueError, match=r"page_dir '.*/ro' is not writable by this process "
                                             r"\(Read-only file system\): pass a directory"):
            zeroopt.ZeroOptimizer(params, "paged_adamw_32bit", page_dir=str(read_only))


def test_a_page_dir_too_small_is_an_error_at_construction(tmp_path):
    """Not a SIGBUS at the first step: the paged file's space is reserved at construction."""
    params = [torch.nn.Parameter(torch.randn(256, 256))]  # 2 fp32 states: 512 KiB
    with _tmpfs(tmp_path / "small", "size=64k") as small:
        with pytest.raises(OSError, match=rf"zeroopt: page_dir '{small}' has no room for this "
                                          r"rank's paged states: this file of them needs 524288 "
                                          r"bytes \(0.50 MiB\), and \d+ bytes are free there"
                                          ) as caught:
            zeroopt.ZeroOptimizer(params, "paged_adamw_32bit", page_dir=str(small))
        assert caught.value.errno == errno.ENOSPC
