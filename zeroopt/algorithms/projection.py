"""Low-rank gradient projections: GaLore's (from an SVD of the gradient) and APOLLO's (a seeded
random Gaussian matrix), with galore-torch's and apollo-torch's semantics.

A projected param's group carries GaLore's keys: ``rank``, ``update_proj_gap`` (T),
``scale`` and ``proj_type``. The basis is refreshed at steps 0, T, 2T... (counted from 0). A
matrix G (m x n) is projected on one side:

- "right": G P^T with P (r x n), the top right singular vectors (GaLore) or a random matrix;
- "left": Q^T G with Q (m x r), the top left singular vectors, or a random matrix;
- "std" projects right when m >= n, left otherwise (the low-rank state is then r x min(m, n));
  "reverse_std" the other way round.

The update found in the low-rank space is projected back (``P`` or ``Q`` on the same side)
and multiplied by ``scale``. Each basis is computed only on the rank that owns the param.
"""

from __future__ import annotations

import math

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
GALORE_KEYS = dict(update_proj_gap=200, scale=0.25, proj_type="std")  # Transformers' defaults
GROUP_KEYS = ("rank", *GALORE_KEYS)  # what a projected param group may carry
# What Transformers' GaLore handlers give a projected group (UpdateRule.transformers_projection)
GALORE_PROJECTION = dict(rank=128, **GALORE_KEYS)


def is_projected(group: dict) -> bool:
    """GaLore's own test: a group that carries ``rank`` is projected."""
    return "rank" in group


def side(proj_type: str, shape: torch.Size) -> str:
    """The side a matrix is projected on, as galore-torch chooses it.

    Args:
        proj_type: one of ``PROJ_TYPES``.
        shape: the matrix's shape ``(m, n)``.

    Returns:
        "right" or "left": "std" gives "right" when m >= n, "reverse_std" the other way round,
        and "left" and "right" give themselves.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def refresh_due(group: dict, t: int, state: dict, key: str) -> bool:
    """Whether step ``t`` (from 1) refreshes the basis: galore-torch refreshes at its
    iteration counter 0, T, 2T... (that is t - 1), and whenever there is none."""
    return key not in state or (t - 1) % group["update_proj_gap"] == 0


def svd_basis(grad: torch.Tensor, rank: int, where: str) -> torch.Tensor:
    """GaLore's orthogonal basis: the top ``rank`` right (r x n) or left (m x r) singular
    vectors of the gradient."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = Vh[:rank, :] if where == "right" else U[:, :rank]
    # A compact copy in the view's own memory order (LAPACK's is column-major): the SVD's
    # n x n factor is freed, and products round exactly as galore-torch's (which keeps it).
    return basis.t().contiguous().t() if basis.stride(0) < basis.stride(1) else basis.clone()


def random_basis(shape: torch.Size, rank: int, where: str, seed: int,
                 device: torch.device) -> torch.Tensor:
    """APOLLO's basis: N(0, 1/r) entries from a generator seeded with ``seed``; the same seed
    gives the same matrix on any rank, so only the seed is kept."""
    m, n = shape
    size = (m, rank) if where == "left" else (rank, n)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(size, generator=generator, device=device) / math.sqrt(rank)


def next_seed(seed: int, advance: int = 0xF) -> int:
    """apollo-torch's seed sequence: the ``advance``-th draw of a generator seeded with it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (advance,),
                         generator=generator).tolist()[-1]


def project(grad: torch.Tensor, basis: torch.Tensor, where: str) -> torch.Tensor:
    """A gradient in the low-rank space.

    Args:
        grad: the gradient G, ``(m, n)``.
        basis: P ``(r, n)`` for "right", Q ``(m, r)`` for "left".
        where: "right" or "left" (``side``).

    Returns:
        G P^T ``(m, r)`` for "right", Q^T G ``(r, n)`` for "left".
    """
    return grad @ basis.t() if where == "right" else basis.t() @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, where: str,
                 scale: float) -> torch.Tensor:
    """A low-rank update back in the param's space, scaled.

    Args:
        low: the update in the low-rank space, as ``project`` returns its shape.
        basis: the same basis ``project`` used.
        where: "right" or "left", as for ``project``.
        scale: GaLore's ``scale``.

    Returns:
        ``low @ P * scale`` for "right", ``Q @ low * scale`` for "left": ``(m, n)``.
    """
    return (low @ basis if where == "right" else basis @ low) * scale


def galore_project(group: dict, grad: torch.Tensor, state: dict, t: int) -> torch.Tensor:
    """The low-rank gradient, refreshing the SVD basis (``state["ortho_matrix"]``) when due."""
    where = side(group["proj_type"], grad.shape)
    if refresh_due(group, t, state, "ortho_matrix"):
        state["ortho_matrix"] = svd_basis(grad, group["rank"], where)
    return project(grad, state["ortho_matrix"], where)


def galore_project_back(group: dict, low: torch.Tensor, state: dict,
                        shape: torch.Size) -> torch.Tensor:
    """GaLore's update back in the param's space, with the basis ``galore_project`` kept.

    Args:
        group: the param group (its ``proj_type`` and ``scale``).
        low: the low-rank update.
        state: the param's state, holding ``"ortho_matrix"``.
        shape: the param's shape ``(m, n)``.

    Returns:
        The update, ``(m, n)``, multiplied by ``group["scale"]``.
    """
    return project_back(low, state["ortho_matrix"], side(group["proj_type"], shape),
                        group["scale"])


def validate_projected(group: dict, rule: str, defaults: dict = GALORE_KEYS) -> None:
    """Fill in the defaults for the keys a projected group leaves out (GaLore's, or the rule's
    own), and check them (every projected param must be a matrix)."""
    for key, default in defaults.items():
        group.setdefault(key, default)
    rank, gap = group["rank"], group["update_proj_gap"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{rule}: rank must be a positive int, got {rank!r}")
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise ValueError(f"{rule}: update_proj_gap must be a positive int, got {gap!r}")
    if group["proj_type"] not in PROJ_TYPES:
        import difflib

        close = difflib.get_close_matches(str(group["proj_type"]), PROJ_TYPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{rule}: unknown proj_type {group['proj_type']!r}.{hint} It takes "
                         f"one of {', '.join(map(repr, PROJ_TYPES))}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(f"{rule}: a param of shape {list(p.shape)} is in a projected group "
                             f"(one with 'rank'), and only matrices can be projected. Put it in "
                             f"a group without 'rank' (zeroopt.galore_param_groups does)")
