"""The states of params stepped whole (GaLore, APOLLO, Adafactor), kept per tensor on the one
rank that owns each param.

Their shapes are the rule's own (GaLore's low-rank moments are r x n, Adafactor's factored
moments a row and a column), so they live in a dict per param, as torch.optim keeps them, not in
the flat shard. With ``state_precision="8bit"`` the rule's ``tensor_states_8bit`` of at least
``min_8bit_size`` elements (bitsandbytes' rule, on the state's own size, as galore-torch's 8-bit
AdamW gets it) are kept between steps as 8-bit blockwise codes and absmax, and decoded to fp32
around each step; "4bit" keeps those of them that also fill whole blocks in torchao's 4-bit
format (``fourbit.py``; saved as their decoded fp32 values, as flat 4-bit states are); "bf16"
keeps them in bf16.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import blockwise, fourbit
from .kinds import block_size


@dataclass
class Encoded:
    """One state tensor in 8-bit (``codes`` padded to whole blocks, ``absmax`` per block),
    4-bit (``codes`` two a byte, ``absmax`` torchao's scale per block of ``block`` elements)
    or bf16 (``codes`` holds the bf16 values, ``absmax`` is None)."""

    codes: torch.Tensor
    absmax: torch.Tensor | None
    shape: torch.Size
    signed: bool
    block: int = 0  # 4-bit: elements per block; 0 for the other precisions

    @staticmethod
    def of(value: torch.Tensor, precision: str, signed: bool, block: int = 0,
           exact: bool = False) -> Encoded:
        """Encode an fp32 state.

        Args:
            value: the state, any shape.
            precision: "bf16", "4bit", or anything else for 8-bit blockwise.
            signed: whether it may be negative (else the unsigned map is used).
            block: 4-bit only: elements per block (they must divide ``value.numel()``).
            exact: 4-bit only: values saved from a 4-bit state decode back bit for bit
                (``fourbit.quantize_exact``; for loading).

        Returns:
            The ``Encoded`` state, remembering ``value``'s shape.
        """
        if precision == "bf16":
            return Encoded(value.to(torch.bfloat16), None, value.shape, signed)
        if precision == "4bit":
            quantize = fourbit.quantize_exact if exact else fourbit.quantize
            codes, scale = quantize(value.reshape(-1).contiguous(), signed, block)
            return Encoded(codes, scale, value.shape, signed, block)
        codes, absmax = blockwise.quantize(_whole_blocks(value), signed)
        return Encoded(codes, absmax, value.shape, signed)

    def decode(self) -> torch.Tensor:
        """The state in fp32, as a new tensor of its own shape."""
        if self.absmax is None:
            return self.codes.float()
        if self.block:
            return fourbit.dequantize(self.codes, self.absmax, self.signed).view(self.shape)
        values = blockwise.dequantize(self.codes, self.absmax, self.signed)
        return values[:self.shape.numel()].view(self.shape)

    def saved(self, name: str) -> dict[str, torch.Tensor]:
        """bitsandbytes' per-tensor form: codes in the state's shape, absmax per block (4-bit:
        the decoded fp32 values, as flat 4-bit states are saved)."""
        if self.absmax is None:
            return {name: self.codes.clone()}
        if self.block:
            return {name: self.decode()}
        n = self.shape.numel()
        return {name: self.codes[:n].view(self.shape).clone(),
                name + "_absmax": self.absmax.clone()}

    def nbytes(self) -> int:
        """Bytes stored: the codes (block padding included) and the fp32 absmax."""
        extra = 0 if self.absmax is None else self.absmax.numel() * 4
        return self.codes.numel() * self.codes.element_size() + extra


class TensorStates:
    """The states of the params this rank steps whole, one dict per param.

    Each entry holds ``"step"``, ``"param_index"`` and the rule's states, any shapes; a
    state is kept encoded (8-bit, 4-bit or bf16, as the group's ``state_precision`` says)
    where it is in ``quantizable`` and, for 8-bit and 4-bit, has at least ``min_8bit_size``
    elements (and for 4-bit, whole blocks of ``block_size``, as torchao asks); fp32
    otherwise.

    Args:
        quantizable: the states that may be kept below 32-bit
            (``UpdateRule.tensor_states_8bit``).
        nonnegative: the states never negative (unsigned 8-bit map).
    """

    def __init__(self, quantizable: tuple[str, ...], nonnegative: tuple[str, ...]):
        self.quantizable, self.nonnegative = quantizable, nonnegative
        self.entries: dict[int, dict] = {}  # param index -> {"step": int, name: tensor | Encoded}

    @contextmanager
    def decoded(self, index: int, group: dict):
        """The state of param ``index`` in fp32 (created empty on first use); encoded back
        into the group's precision afterwards."""
        stored = self.entries.setdefault(index, {"step": 0, "param_index": index})
        state = {k: v.decode() if isinstance(v, Encoded) else v for k, v in stored.items()}
        yield state
        for name, value in state.items():
            stored[name] = self._encode(name, value, group)

    def saved(self, index: int) -> dict:
        """Param ``index``'s state as saved: tensors cloned, 8-bit ones in bitsandbytes' form."""
        out = {}
        for name, value in self.entries.get(index, {}).items():
            if isinstance(value, Encoded):
                out.update(value.saved(name))
            elif isinstance(value, torch.Tensor):
                out[name] = value.clone()
            else:
                out[name] = value
        return out

    def load(self, index: int, saved: dict, group: dict) -> None:
        """Param ``index``'s state from its saved form (any precision), kept in the group's:
        8-bit codes stay as they are where the group keeps 8-bit (no re-rounding)."""
        stored = {}
        for name, value in saved.items():
            if name.endswith("_absmax") or name == "param_name":
                continue
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                absmax = saved.get(name + "_absmax")
                if absmax is None:
                    raise ValueError(f"state {name!r} holds 8-bit codes without "
                                     f"{name + '_absmax'!r}, their blocks' scales")
                value = Encoded(_whole_blocks(value), absmax.float().reshape(-1), value.shape,
                                name not in self.nonnegative)
                if group["state_precision"] != "8bit":
                    value = self._encode(name, value.decode(), group)
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                value = self._encode(name, value.float().clone(), group, exact=True)
            stored[name] = value
        stored["step"] = int(stored.get("step", 0))
        stored["param_index"] = index
        self.entries[index] = stored

    def forget(self, index: int) -> None:
        """Drop param ``index``'s state: it starts afresh at its next step (torch.optim's
        state for a param a loaded state dict has none for)."""
        self.entries.pop(index, None)

    def _encode(self, name: str, value: torch.Tensor, group: dict, exact: bool = False):
        """``value`` as the group keeps state ``name``: encoded, or fp32 as it is. ``exact``:
        loading (4-bit: saved 4-bit values decode back bit for bit)."""
        precision = group["state_precision"]
        if precision == "32bit" or name not in self.quantizable:
            return value
        signed = name not in self.nonnegative
        if precision == "bf16":
            return Encoded.of(value, precision, signed)
        if value.numel() < group["min_8bit_size"]:
            return value
        if precision == "4bit":
            block = block_size(group)
            if value.numel() % block:
                return value
            return Encoded.of(value, precision, signed, block, exact)
        return Encoded.of(value, precision, signed)

    def nbytes(self) -> int:
        """Bytes of every state tensor held, encoded ones as stored."""
        total = 0
        for entry in self.entries.values():
            for value in entry.values():
                if isinstance(value, Encoded):
                    total += value.nbytes()
                elif isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total


def _whole_blocks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` flattened and zero-padded to whole 256-element blocks."""
    flat = tensor.reshape(-1)
    pad = -flat.numel() % blockwise.BLOCK
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat.contiguous()
