"""The one walk between the shard and the saved form of its params.

A param's saved form is flat, in the param's element order: each of its group's states under
the state's name (fp32 or bf16 values, or 8-bit codes with ``<name>_absmax``: one fp32 per
256-element block of the param, as bitsandbytes keeps them), and ``master_param`` for 16-bit
params. Params stepped whole keep their rule's per-tensor states instead (``tensor_state``).

A rank holds *pieces* of params (``Layout.pieces``): runs of a param's elements inside one of
its buckets' chunks. ``piece_entries`` says which entries of which saved tensors a run of
elements is, and where they lie in the region's tensors; ``load_entries`` puts saved entries
back. ``state_dict.py`` runs it over every rank's pieces gathered into whole buffers;
``optimizer_items.py`` over each rank's own pieces, written as ranges of a DCP checkpoint.
"""

from __future__ import annotations

import torch

from . import encoding

MASTER = "master_param"


def state_names(shard, slot) -> tuple[str, ...]:
    """The flat states saved for a param: its group's states (none for a param stepped whole:
    its rule keeps per-tensor states instead).

    Args:
        shard: the ``zeroopt.shard.Shard``.
        slot: the param's ``ParamSlot``.

    Returns:
        State names, in the rule's order.
    """
    if shard.layout.buffers[slot.buffer].kind.whole:
        return ()
    return tuple(shard.rule.states(shard.param_groups[slot.group]))


def encoded_tensors(shard, buffer) -> dict[str, tuple[torch.Tensor, int]]:
    """A buffer's part of the shard in saved form: every state of its region as it is kept
    (8-bit codes and their absmax, bf16 or fp32 values) and its fp32 master if it is 16-bit.

    Args:
        shard: the ``Shard``.
        buffer: one of ``shard.layout.buffers``.

    Returns:
        ``{saved name: (tensor, elements per entry)}``; the tensors are indexed by region
        offset (``FlatBuffer.region_offset``) divided by their elements per entry (256 for
        absmax, 1 otherwise).
    """
    region = shard.regions[buffer.index]
    tensors = {}
    for name in region.signed:
        tensors.update(region.encoded(name))
    if buffer.index in shard.masters:
        tensors[MASTER] = (shard.masters[buffer.index], 1)
    return tensors


def piece_entries(tensors: dict[str, tuple[torch.Tensor, int]], names: tuple[str, ...],
                  param_offset: int, numel: int,
                  at: int) -> dict[str, tuple[int, int, torch.Tensor]]:
    """The saved entries of the param elements ``[param_offset, param_offset + numel)``.

    Args:
        tensors: ``encoded_tensors``' form (or the same gathered into whole buffers).
        names: the param's state names (``state_names``); the master is always taken.
        param_offset: the first element, in the param's flat element order.
        numel: how many elements.
        at: where element ``param_offset`` lies in ``tensors`` (in elements).

    Returns:
        ``{saved name: (first, end, entries)}``: entries ``[first, end)`` of the param's
        flat saved tensor, and a view of them in ``tensors``. 8-bit params start on a block,
        so their absmax entries cover whole blocks.
    """
    out = {}
    for saved, (tensor, per) in tensors.items():
        if saved.removesuffix("_absmax") not in (*names, MASTER):
            continue
        first, end = covering(param_offset, numel, per)
        out[saved] = (first, end, tensor[at // per:at // per + end - first])
    return out


@torch.no_grad()
def load_entries(shard, piece, name: str, values: dict[str, torch.Tensor],
                 first_element: int) -> None:
    """Put saved state ``name`` (or ``master_param``) of a piece into the shard, converted
    into the form its region keeps (``encoding.load_piece``).

    Args:
        shard: the ``Shard``.
        piece: the ``Piece`` (of ``shard.layout.pieces``) to fill.
        name: a state name or ``"master_param"``.
        values: saved tensors by saved name (``name``, and ``name + "_absmax"`` for 8-bit
            codes), flat or in the param's shape, starting at the param's element
            ``first_element`` (their absmax at its block).
        first_element: the param element ``values`` start at; at most ``piece.param_offset``.
    """
    buffer = shard.layout.buffers[piece.slot.buffer]
    region_lo = buffer.region_offset(piece.shard_offset)
    offset = piece.param_offset - first_element  # where the piece starts in ``values``
    if name == MASTER:
        shard.masters[buffer.index][region_lo:region_lo + piece.numel].copy_(
            values[name].reshape(-1)[offset:offset + piece.numel])
        return
    encoding.load_piece(shard.regions[buffer.index], name, values, offset, piece.numel,
                        region_lo)


def tensor_state(shard, index: int) -> dict:
    """What the rule keeps for a param stepped whole (GaLore's basis, Adafactor's factors, its
    step count), as it saves it, without its param index.

    Args:
        shard: the ``Shard``; this rank must own the param.
        index: the param's state_dict index.

    Returns:
        ``{name: tensor or value}``; empty while the param has not stepped.
    """
    saved = shard.whole.states.saved(index)
    saved.pop("param_index", None)
    return saved


def covering(offset: int, numel: int, per: int) -> tuple[int, int]:
    """The entries ``[first, end)`` that cover elements ``[offset, offset + numel)`` at
    ``per`` elements an entry."""
    return offset // per, -(-(offset + numel) // per)
