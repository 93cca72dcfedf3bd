"""zeroopt.wrap at several ranks (tests/test_wrap.py): each wrapped class trains sharded on
this rank's batches, the class itself unsharded on the exact average of every rank's gradient
(zeroopt reducing in fp64, ``training.EXACT``), so both see the same gradients bit for bit."""

from __future__ import annotations

import importlib
import warnings

import zeroopt
from training import EXACT, max_rel_err, models, train_side_by_side

STEPS = 6
CASES = {  # case -> (class, hyperparameters)
    # a per-param statistic (the kept fraction), all-reduced across the shards
    "pytorch_optimizer.Lion cautious": ("pytorch_optimizer.Lion",
                                        dict(lr=1e-3, cautious=True, weight_decay=0.1)),
    # whole tensors, each stepped by the rank that owns it
    "transformers Adafactor": ("transformers.optimization.Adafactor",
                               dict(lr=1e-2, relative_step=False, scale_parameter=False,
                                    beta1=0.9, weight_decay=0.1)),
    "bitsandbytes AdEMAMix": ("bitsandbytes.optim.AdEMAMix",
                              dict(lr=1e-2, t_alpha=4, t_beta3=4, weight_decay=0.1)),
    "torch RMSprop": ("torch.optim.RMSprop",
                      dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.1)),
}
# Same gradients, so only the update's arithmetic differs: cautious Lion's rescaling of the
# kept fraction (zeroopt: fp64, from the all-reduced count; pytorch-optimizer: fp32) observed
# 1.1e-7; Adafactor and RMSprop bit for bit; bitsandbytes' AdEMAMix 5.7e-7 (2.2e-6 in
# tests/test_wrap.py's model: its beta3 warm-up leaves out apple's 1e-8 in log(beta)).
TOLERANCE = {"pytorch_optimizer.Lion cautious": 1e-6, "transformers Adafactor": 0.0,
             "bitsandbytes AdEMAMix": 1e-5, "torch RMSprop": 1e-6}


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def suite() -> dict[str, float]:
    """Every case's largest relative param error after STEPS steps."""
    errors = {}
    for case, (path, hp) in CASES.items():
        cls = _class(path)
        model, ref = models()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = zeroopt.wrap(cls(model.parameters(), **hp), **EXACT)
            train_side_by_side(model, opt, [(ref, cls(ref.parameters(), **hp))],
                               range(1, STEPS + 1))
        errors[case] = max_rel_err(model, ref)
    return errors
