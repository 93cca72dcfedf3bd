"""Adam(W) options for fine-tuning (LoRA and full), each off by default. adam.py wires them;
the eager, per-tensor definition of every option (the reference, and the step of params
stepped whole) is ``variants.reference_with_options``.

- ``spd=True``: Selective Projection Decay (Tian et al. 2024, "Rethinking Weight Decay for
  Robust Fine-Tuning of Foundation Models", NeurIPS; authors' code GT-RIPL/
  Selective-Projection-Decay, adamSPD.py). ``weight_decay`` is SPD's strength lambda and no
  other decay is applied (as AdamSPD; for ``adam`` too). With x0 the param at its first step
  (state ``initial_param``, kept 32-bit) and x~ = x - lr u the plain update:
  c = -<g, x - x0> (whole param); where c < 0 (the gradient points along the displacement)
  r = clamp((||x~ - x0|| - ||x - x0||) / ||x~ - x0||, 0, 1) and x <- x~ - lambda r (x~ - x0);
  else x <- x~. g is the raw gradient (after ``maximize``), as the paper's g_t. A fork (NVIDIA
  NeMo's adam_spd.py) drops the minus sign of c, calling the paper's sign a bug; zeroopt
  follows the paper and the authors' code.
- ``orthograd=True``: the gradient made orthogonal to the weight, per whole param (Prieto et
  al. 2025, "Grokking at the Edge of Numerical Stability", their orthograd.py):
  g <- g - (<x, g> / (<x, x> + 1e-30)) x, then rescaled to the gradient's norm,
  ||g|| / (||g_perp|| + 1e-30): the paper writes the projection, and the authors' orthograd.py
  and pytorch_optimizer.OrthoGrad also rescale, so zeroopt does. A gradient parallel to the
  weight (||g_perp|| <= 4 eps_fp32 ||g||: a 0-d param's always is) becomes zero, as in
  pytorch_optimizer's guard (the authors' code would rescale its rounding noise).
- ``agr=True``: Adaptive Gradient Regularization (Jiang et al. 2024, arXiv 2407.16944; the
  authors' AGR.py, AdamW_AGR.py): alpha = |g| / sum|g| over the whole param, g <- g - alpha g,
  computed as g (sum|g| - |g|) / sum|g|: a lone nonzero element (a 0-d param) gets exactly 0,
  as AGR.py's g - g (|g| / sum|g|) gives it (the form g - (g |g|) / sum|g| leaves rounding
  noise that Adam scales up to full steps); a zero gradient stays zero.
- ``tam=True``: Torque-Aware Momentum (Malviya et al. 2024, arXiv 2412.18790): s <- gamma s +
  (1 - gamma) cos(m, g) with cos the cosine of the whole previous momentum and the gradient the
  moments see (after agr and orthograd, with adam's L2 term; 0 where one is zero, as
  F.normalize), gamma = ``tam_decay_rate`` (0.9, pytorch_optimizer's decay_rate); the
  gradient's weight in the first moment is damped by d = (1 + s) / 2 + eps:
  m <- b1 m + (1 - b1) d g (Adam's EMA and bias correction kept; v is undamped; the paper's
  TAM is m <- b m + (d + eps) g on SGD). s (state ``tam_s``) is one number per param, stored in
  every element (as pytorch_optimizer's s, a full tensor). pytorch_optimizer's TAM/AdaTAM differ: their s is element-wise (F.normalize along
  dim 0, multiplied element by element, never summed into a cosine), and AdaTAM drops Adam's
  (1 - b1) and bias corrections; zeroopt follows the paper's per-tensor cosine.
- ``alora=True``: ALLoRA's adaptive learning rate (Huang & Balestriero 2024, "ALLoRA: Adaptive
  Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692), per row: each row i (dim 0, the
  rest flattened) of each LoRA matrix steps lr / sqrt(||x_i||^2 + 1 / eta^2), eta =
  ``alora_eta``: at most lr eta for a zero row (lora_B's start), then inversely proportional to
  the row's norm. Rows are output features: lora_A (r, in)'s r rank components, lora_B
  (out, r)'s out outputs. A group with ``alora=True`` holds LoRA matrices only, named (PEFT's
  ``...lora_A.<adapter>.weight``, ``...lora_embedding_A.<adapter>``: pass
  ``model.named_parameters()``), each with its partner: the name with ``lora_A`` swapped for
  ``lora_B`` (or back) in the same group. No pair, a nameless or a non-LoRA trainable param:
  ValueError. Each LoRA matrix is stepped whole, on one rank (a flat piece does not know its
  rows). The row form and ``alora_eta=2.0`` are those of Automagic_AdamS (an sd-scripts
  optimizer citing ALLoRA), which takes 1 / sqrt(||x_i|| + 1/eta^2) once, at the first step;
  zeroopt squares the norm and takes the current rows, so the coefficient is inversely
  proportional to the rows' l2 norm, as ALLoRA's abstract states.
- ``dynamic_weight_decay=True``: the decay in effect (AdamW's, Adam's L2, SPD's lambda) times 1
  up to ``wd_transition_steps`` steps of the param, then max(``wd_min_ratio``,
  ``wd_decay_factor`` ** ((t - T) / T)). No paper: the schedule of HinaAdamW's option of the
  same name (an sd-scripts fork).

Where they run. Options that need statistics of a whole param (spd, orthograd, agr, tam, and
cautious) run on the flat shard (params straddle ranks): each rank sums its pieces, the
optimizer all-reduces every group's sums once, and the step finishes with the totals
(``statistics``, ``fused_step``). One round of sums suffices when the statistics do not
depend on other whole-param statistics: agr, orthograd and tam together (their sums expand to
sums of the raw gradient, weight and momentum), or cautious and spd together. So a group is
stepped whole instead (each param owned whole by one rank, ``whole``; states per tensor, the
moments 8-bit where asked) when it combines cautious or spd with agr, orthograd or tam, when
it uses alora (row norms need whole rows), or when it uses spd, orthograd, agr or tam with
states that are not resident 32-bit (8-bit, bf16: the second phase of a flat step cannot
decode them). paged=True with these options is refused.
"""

from __future__ import annotations

import math
import re

import torch

from . import adamw_options_native as native_kernels
from . import variants
from .base import ShardTensors, check_number

OPTIONS = ("spd", "orthograd", "agr", "tam", "alora", "dynamic_weight_decay")
DEFAULTS = dict(spd=False, orthograd=False, agr=False, tam=False, tam_decay_rate=0.9,
                alora=False, alora_eta=2.0, dynamic_weight_decay=False,
                wd_transition_steps=1000, wd_decay_factor=0.7, wd_min_ratio=0.1)
TRANSFORMS = ("agr", "orthograd", "tam")  # change the gradient / momentum from whole-param sums
_STATISTICS = ("spd", *TRANSFORMS)
_LORA = re.compile(r"^lora_(embedding_)?([AB])$")
_FP32_EPS = torch.finfo(torch.float32).eps


def any_option(group: dict) -> bool:
    """Whether the group turns on one of ``OPTIONS`` (missing keys count as off)."""
    return any(group.get(name) for name in OPTIONS)


def own_step(group: dict) -> bool:
    """Whether the group needs this module's step (not only the dynamic decay, which the
    plain steps take as their ``weight_decay``)."""
    return _on(group, (*_STATISTICS, "alora"))


def _on(group: dict, names) -> bool:
    return any(group.get(name) for name in names)


def whole(group: dict) -> bool:
    """Whether this group's params are stepped whole (see the module docstring)."""
    if group.get("alora"):
        return True
    if (group.get("cautious") or group.get("spd")) and _on(group, TRANSFORMS):
        return True
    resident = group.get("state_precision", "32bit") == "32bit" and not group.get("paged")
    return _on(group, _STATISTICS) and not resident


def per_tensor(group: dict) -> bool:
    """Whether the flat step needs whole-param statistics (``UpdateRule.per_tensor``)."""
    return not whole(group) and bool(group.get("cautious") or _on(group, _STATISTICS))


def states(group: dict) -> tuple[str, ...]:
    """The flat states: none for groups stepped whole (their states are per tensor)."""
    if whole(group):
        return ()
    return ("exp_avg", "exp_avg_sq") + (("initial_param",) if group.get("spd") else ()) + \
        (("tam_s",) if group.get("tam") else ())


def initial_values(group: dict) -> dict:
    """SPD's x0 starts as a copy of the param (flat groups; whole ones copy it lazily)."""
    return {"initial_param": "param"} if group.get("spd") and not whole(group) else {}


def decay_factor(group: dict, t: int) -> float:
    """The dynamic weight decay's multiplier at the param's step ``t`` (1 when off)."""
    transition = group.get("wd_transition_steps", 1000)
    if not group.get("dynamic_weight_decay") or t <= transition:
        return 1.0
    return max(group["wd_min_ratio"], group["wd_decay_factor"] ** ((t - transition) / transition))


def effective_weight_decay(group: dict, t: int) -> float:
    """``weight_decay`` at step ``t``, with the dynamic schedule."""
    return group["weight_decay"] * decay_factor(group, t)


def with_effective_decay(group: dict, step: torch.Tensor) -> dict:
    """A copy of ``group`` with the weight decay in effect at ``step`` (dynamic schedule)."""
    return dict(group, weight_decay=effective_weight_decay(group, int(step.item())))


# --- validation ------------------------------------------------------------------------------


def validate(group: dict) -> None:
    """Check the options (see the module docstring); fills ``layerwise=False`` into groups
    stepped whole (whole_tensors.py reads it).

    Raises:
        ValueError: a bad value, paged states with a statistics option, 4-bit states with
            params stepped whole, alora without LoRA pairs.
    """
    for name in OPTIONS:
        if not isinstance(group[name], bool):
            raise ValueError(f"{name} must be True or False, got {group[name]!r}")
    if not 0.0 <= check_number(group["tam_decay_rate"], "tam_decay_rate") < 1.0:
        raise ValueError(f"tam_decay_rate must be in [0, 1), got {group['tam_decay_rate']}")
    if check_number(group["alora_eta"], "alora_eta") <= 0:
        raise ValueError(f"alora_eta must be > 0, got {group['alora_eta']}")
    steps = group["wd_transition_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"wd_transition_steps must be an int >= 1, got {steps!r}")
    if not 0.0 < check_number(group["wd_decay_factor"], "wd_decay_factor") <= 1.0:
        raise ValueError(f"wd_decay_factor must be in (0, 1], got {group['wd_decay_factor']}")
    if not 0.0 <= check_number(group["wd_min_ratio"], "wd_min_ratio") <= 1.0:
        raise ValueError(f"wd_min_ratio must be in [0, 1], got {group['wd_min_ratio']}")
    on = [name for name in (*_STATISTICS, "alora") if group[name]]
    if on and group.get("paged"):
        raise ValueError(f"{on[0]}=True with paged=True: {on[0]} needs whole-param statistics "
                         f"(or whole params) that paged states cannot be stepped with; use "
                         f"paged=False")
    if group["alora"]:
        check_lora_pairs(group)
    if whole(group):
        if group.get("state_precision") not in (None, "32bit", "bf16", "8bit"):
            raise ValueError(f"state_precision={group['state_precision']!r} with these "
                             f"options: their params are stepped whole, with per-tensor states "
                             f"kept in '32bit', 'bf16' or '8bit'")
        if group.setdefault("layerwise", False) is not False:
            raise ValueError("adam/adamw have no layerwise mode: use layerwise=False")


def lora_role(name: str | None) -> tuple[str, str] | None:
    """``(A or B, the partner's name)`` for a LoRA matrix's name, else None."""
    parts = (name or "").split(".")
    for i, part in enumerate(parts):
        match = _LORA.match(part)
        if match:
            other = "B" if match.group(2) == "A" else "A"
            partner = f"lora_{match.group(1) or ''}{other}"
            return match.group(2), ".".join(parts[:i] + [partner] + parts[i + 1:])
    return None


def check_lora_pairs(group: dict) -> None:
    """alora=True: every trainable param named as a LoRA matrix, each with its partner in
    the group, and at least one pair.

    Raises:
        ValueError: no names, a non-LoRA param, an unpaired matrix, no pair.
    """
    names = group.get("param_names")
    if not group["params"]:
        return
    if not names:
        raise ValueError("alora=True finds LoRA pairs by name: pass model.named_parameters() "
                         "(or param groups of (name, param) pairs)")
    params = group["params"]
    trainable = [n for n, p in zip(names, params)
                 if not isinstance(p, torch.Tensor) or p.requires_grad]
    roles = {name: lora_role(name) for name in trainable}
    if trainable and not any(roles.values()):
        raise ValueError(f"alora=True found no lora_A/lora_B pair among the group's params "
                         f"(PEFT's names: ...lora_A.default.weight); it has {trainable[:3]}...")
    for name, role in roles.items():
        if role is None:
            raise ValueError(f"alora=True: {name!r} is not a LoRA matrix (lora_A/lora_B); put "
                             f"the LoRA matrices in a param group of their own with alora=True "
                             f"and the other params in one with alora=False")
        if role[1] not in roles:
            raise ValueError(f"alora=True: {name!r} has no partner {role[1]!r} in its group")


# --- the flat step: phase 1 (this rank's sums), phase 2 (with the totals) ---------------------

_TRANSFORM_ROWS = 11  # see _transform_sums
_PROJECTION_ROWS = 5  # kept, <g, d>, <d, d>, <u, d>, <u, u>   (d = x - x0)


def _rows(group: dict) -> int:
    return _TRANSFORM_ROWS if _on(group, TRANSFORMS) else _PROJECTION_ROWS


def statistics(group: dict, shard: ShardTensors, step: torch.Tensor,
               decoupled: bool) -> torch.Tensor:
    """Phase 1 for groups with an option of this module on: this rank's partial sums per
    param, ``[rows, num_params]`` (float64)."""
    if not shard.params:
        return torch.zeros(_rows(group), shard.num_params, dtype=torch.float64)
    t = int(step.item())
    rows = None
    if _on(group, TRANSFORMS) and native(group, shard):
        rows = native_kernels.transform_sums(group, shard, _TRANSFORM_ROWS)
    elif group["spd"] and not (group["adopt"] and t == 1) and native(group, shard):
        rows = native_kernels.projection_sums(group, shard, t, _PROJECTION_ROWS)
    if rows is not None:  # one pass per piece (maximize's negation included)
        return _per_param(shard, torch.tensor(rows, dtype=torch.float64), len(rows[0]))
    if group["maximize"]:
        torch._foreach_neg_(shard.grads)  # consumed; phase 2 takes them as they are
    if _on(group, TRANSFORMS):
        return _transform_sums(group, shard)
    return _projection_sums(group, shard, int(step.item()), decoupled)


_CHUNK = 1 << 20  # elements converted to float64 at a time


def _sums(vectors: list[torch.Tensor], terms) -> torch.Tensor:
    """``[len(terms)]`` float64 sums over one piece: ``(i, j)`` is <v_i, v_j>, ``(i, None)``
    the sum of v_i. Taken in float64, in chunks: products of fp32 numbers are exact there, so
    differences of these sums (||g - p x||^2 for a gradient nearly parallel to the weight)
    keep their precision."""
    out = torch.zeros(len(terms), dtype=torch.float64, device=vectors[0].device)
    for lo in range(0, vectors[0].numel(), _CHUNK):
        v = [t[lo:lo + _CHUNK].double() for t in vectors]
        a = v[0].abs()  # the gradient's magnitude, and g |g|, derived exactly
        v += [a, v[0] * a]
        out += torch.stack([v[i].sum() if j is None else torch.dot(v[i], v[j])
                            for i, j in terms])
    return out


def _per_param(shard: ShardTensors, pieces: list[torch.Tensor] | torch.Tensor,
               rows: int) -> torch.Tensor:
    """``[rows, num_params]``: each row's values per piece (a tensor per piece, or a
    ``[pieces, rows]`` table) summed per param, as ``shard.per_param`` sums one row (the same
    additions, in the same order), all rows in one ``index_add_``."""
    if len(pieces) == 0:
        return torch.zeros(rows, shard.num_params, dtype=torch.float64)
    table = torch.stack(pieces) if isinstance(pieces, list) else pieces
    out = torch.zeros(shard.num_params, rows, dtype=torch.float64, device=table.device)
    out.index_add_(0, shard.param_index.to(table.device), table.double())
    return out.t().contiguous()


# vectors: 0 g, 1 x, 2 m, then 3 a = |g|, 4 g a   (m = x where tam is off: its rows unused)
_TRANSFORM_TERMS = ((3, None), (1, 0), (1, 4), (1, 1), (0, 0), (4, 0), (4, 4),
                    (2, 0), (2, 4), (2, 1), (2, 2))


def _transform_sums(group: dict, shard: ShardTensors) -> torch.Tensor:
    """agr, orthograd, tam: everything their scalars need, as sums of the raw gradient g, the
    weight x and the previous momentum m (a = |g|): sum a, <x,g>, <x,ga>, <x,x>, <g,g>,
    sum a^3, sum g^4, <m,g>, <m,ga>, <m,x>, <m,m>."""
    moments = shard.states["exp_avg"] if group["tam"] else shard.params
    pieces = [_sums([g, x, m], _TRANSFORM_TERMS)
              for g, x, m in zip(shard.grads, shard.params, moments)]
    return _per_param(shard, pieces, _TRANSFORM_ROWS)


def _projection_sums(group: dict, shard: ShardTensors, t: int, decoupled: bool) -> torch.Tensor:
    """cautious and spd: the update direction (moments updated) stashed over the gradients,
    masked if cautious; sums: kept count, <g, d>, <d, d>, <u, d>, <u, u> with d = x - x0."""
    spd = group["spd"]
    wd = 0.0 if spd else effective_weight_decay(group, t)
    grads, params = shard.grads, shard.params
    zero = torch.zeros(shard.num_params, dtype=torch.float64)
    rows = [zero] * _PROJECTION_ROWS
    if spd:
        displacement = torch._foreach_sub(params, shard.states["initial_param"])
        before = _per_param(shard, [_sums([g, d], ((0, 1), (1, 1)))
                                    for g, d in zip(grads, displacement)], 2)
        rows[1], rows[2] = before[0], before[1]
    direction = variants.adam_direction(dict(group, maximize=False, weight_decay=wd), shard, t,
                                        decoupled)
    if direction is None:  # ADOPT's first step only initialises v
        return torch.stack([zero] * _PROJECTION_ROWS)
    if group["cautious"]:
        rows[0] = variants.keep_agreeing(direction, grads, shard)[0]
    if spd:
        after = _per_param(shard, [_sums([u, d], ((0, 1), (0, 0)))
                                   for u, d in zip(direction, displacement)], 2)
        rows[3], rows[4] = after[0], after[1]
    torch._foreach_copy_(grads, direction)
    return torch.stack(rows)


def fused_step(group: dict, shard: ShardTensors, step: torch.Tensor, stats: torch.Tensor,
               decoupled: bool) -> None:
    """Phase 2 for groups with whole-param statistics and an option of this module on."""
    t, stats = int(step.item()), stats.cpu()  # per-param scalars: worked out on the host
    if _on(group, TRANSFORMS):
        return _transform_step(group, shard, t, stats, decoupled)
    return _projection_step(group, shard, t, stats)


def transform_scalars(group: dict, totals: torch.Tensor, wd: float) -> dict:
    """Per param (float64 [num_params]): agr's 1/sum|g|, orthograd's projection p and rescale
    c, and tam's cosine between the previous momentum and the gradient the moments see
    (agr'd, orthogonalised, with Adam's L2 term): every inner product expanded into the sums
    of ``_transform_sums``."""
    (s_abs, xg, xga, xx, gg, a3, g4, mg, mga, mx, mm) = totals
    inv_s = torch.where(s_abs > 0, 1 / s_abs, torch.zeros_like(s_abs)) if group["agr"] \
        else torch.zeros_like(s_abs)
    xg1 = xg - inv_s * xga  # <x, g1>, g1 = g - g|g|/S
    gg1 = gg - 2 * inv_s * a3 + inv_s**2 * g4  # ||g1||^2
    mg1 = mg - inv_s * mga
    p, c = torch.zeros_like(xg), torch.ones_like(xg)
    gg2, xg2, mg2 = gg1, xg1, mg1
    if group["orthograd"]:
        p = xg1 / (xx + 1e-30)
        perp = (gg1 - 2 * p * xg1 + p * p * xx).clamp_min(0)  # ||g1 - p x||^2
        norm, perp_norm = gg1.clamp_min(0).sqrt(), perp.sqrt()
        c = torch.where(perp_norm <= 4 * _FP32_EPS * norm, torch.zeros_like(norm),
                        norm / (perp_norm + 1e-30))
        gg2, xg2, mg2 = c * c * perp, c * (xg1 - p * xx), c * (mg1 - p * mx)
    if wd:  # Adam's L2 term joins the gradient the moments see
        gg2, mg2 = gg2 + 2 * wd * xg2 + wd * wd * xx, mg2 + wd * mx
    cos = mg2 / (mm.sqrt().clamp_min(1e-12) * gg2.clamp_min(0).sqrt().clamp_min(1e-12))
    return dict(inv_s=inv_s, p=p, c=c, cos=cos)


def _transform_step(group: dict, shard: ShardTensors, t: int, totals: torch.Tensor,
                    decoupled: bool) -> None:
    wd = effective_weight_decay(group, t)
    scalars = transform_scalars(group, totals, 0.0 if decoupled else wd)
    rows = [scalars[k] for k in ("inv_s", "p", "c", "cos")] + [totals[0]]
    # shard.per_piece of each row, in one gather and one host read
    inv_s, p, c, cos, sums = torch.stack(rows)[:, shard.param_index].tolist()
    if native(group, shard):
        return native_kernels.transform_step(group, shard, t, wd, decoupled,
                                             dict(inv_s=inv_s, p=p, c=c, cos=cos, sums=sums))
    grads, params = shard.grads, shard.params  # maximize was applied in phase 1
    for i, (x, g) in enumerate(zip(params, grads)):
        if group["agr"] and inv_s[i]:  # g (S - |g|) / S: exactly 0 for a lone element
            g.mul_(g.abs().neg_().add_(sums[i]).mul_(inv_s[i]))
        if group["orthograd"]:
            g.add_(x, alpha=-p[i]).mul_(c[i])
    direction = variants.adam_direction(dict(group, maximize=False, weight_decay=wd), shard, t,
                                        decoupled, tam_cos=cos if group["tam"] else None)
    if direction is not None:
        torch._foreach_add_(params, direction, alpha=-group["lr"])


def spd_scalars(totals: torch.Tensor, lr: float, scale: torch.Tensor,
                strength: float) -> torch.Tensor:
    """Per param: SPD's lambda r where it projects (c = -<g, d> < 0), else 0. With u the
    (scaled) direction and x~ = x - lr u: ||x~ - x0||^2 = <d,d> - 2 lr <u,d> + lr^2 <u,u>, and
    ||x~ - x0|| - ||d|| from the difference of squares (no cancellation)."""
    _, gd, dd, ud, uu = totals
    change = -2 * lr * scale * ud + (lr * scale) ** 2 * uu  # ||x~ - x0||^2 - ||d||^2
    new = (dd + change).clamp_min(0).sqrt()
    old = dd.clamp_min(0).sqrt()
    ratio = torch.where(new > 0, change / ((new + old) * new).clamp_min(1e-300),
                        torch.zeros_like(new)).clamp(0, 1)
    return torch.where(-gd < 0, strength * ratio, torch.zeros_like(ratio))


def _projection_step(group: dict, shard: ShardTensors, t: int, totals: torch.Tensor) -> None:
    if group["adopt"] and t == 1:
        return  # phase 1 initialised v; no update on ADOPT's first step
    scale = shard.param_numel / (totals[0] + 1) if group["cautious"] \
        else torch.ones(shard.num_params, dtype=torch.float64)
    lr = group["lr"]
    steps = shard.per_piece(-lr * scale)
    pull = shard.per_piece(spd_scalars(totals, lr, scale, effective_weight_decay(group, t))) \
        if group["spd"] else [0.0] * len(steps)
    anchors = shard.states["initial_param"] if group["spd"] else shard.params
    if native_kernels.projection_apply(shard, anchors, steps, pull):  # the ops below
        return
    torch._foreach_mul_(shard.grads, steps)
    torch._foreach_add_(shard.params, shard.grads)
    if group["spd"]:
        for x, x0, k in zip(shard.params, shard.states["initial_param"], pull):
            if k:
                x.lerp_(x0, k)


def native(group: dict, shard: ShardTensors) -> bool:
    """Whether the C kernels take this group's shard (``adamw_options_native.usable``)."""
    return native_kernels.usable(group, shard)


def placement_cost(shape: torch.Size) -> int:
    """An Adam step of a whole param costs its numel."""
    return int(math.prod(shape))
