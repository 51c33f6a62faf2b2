"""A linear layer whose weight stays in GGUF block layout on the device.

In: the weight as ``parts``, each a uint8 ``[rows_i, row_bytes_i]`` tensor of one
:class:`gguf.GGMLQuantizationType` holding ``rows_i`` output rows of ``in_features``
elements exactly as the file stores them, stacked along the output dimension in the given
order (a fused Q|K|V or gate|up projection may mix types: a Q4_K_M file has Q4_K q/k and
Q6_K v); an optional bias ``[out_features]``. Out: ``forward(x)`` maps
``[..., in_features]`` to ``[..., out_features]`` in ``x.dtype``.

Two kernel sets (``kernels``): ``triton`` (a GPU, or tests under Triton's interpreter) and
``native`` (the CPU: :mod:`rocmforge.native`'s C++ operators).

With ``triton`` the layer owns its byte buffers: consecutive parts of one type are
concatenated at construction into one buffer (``register_buffer``, so ``.to(device)`` moves
them and ``buffers()`` counts them), and ``forward`` makes one :func:`quant_matmul` launch
per buffer, each writing its column slice of one preallocated output::

    parts   Q4_K [q rows] | Q4_K [k rows] | Q6_K [v rows]
    buffers weight_0 (Q4_K, q+k rows)     | weight_1 (Q6_K, v rows)
    output  y[:, 0 : q+k]                 | y[:, q+k : q+k+v]

With ``native`` every part stays its own buffer, as given (merging them would copy every
fused weight once more at load), and one operator call computes all parts (the activations
are quantized once per format per call), in fp32.

A caller may permute the rows of a part before construction (the Q/K rope permutation):
blocks run along a row, so ``part[perm]`` is the exact quantized form of the permuted
weight. :meth:`GGUFLinear.dequantize` is the dense reference (``F.linear`` on it is what
``forward`` computes). Ask :meth:`GGUFLinear.supports` before building one (and
:func:`rocmforge.kernels.kernels_usable` for a Triton device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from rocmforge import native
from rocmforge.gguf.dequant import dequantize
from rocmforge.kernels import triton_available

__all__ = ["NATIVE_DENSE_MIN_ROWS", "GGUFLinear", "LinearKernels"]

LinearKernels = str
"""``triton`` or ``native`` (module docstring)."""


DENSE_MIN_ROWS = 256
"""From this many input rows on (prefill), a weight buffer is dequantized to the activation
dtype and multiplied by the BLAS GEMM: its ``2 M N K`` flops on tensor cores outweigh one
extra pass over the weight. Below, the decode-in-the-matmul kernels read the blocks once."""

NATIVE_DENSE_MIN_ROWS = 32
"""The same crossover for the native CPU kernels of the types outside
``native.INTEGER_GEMM_TYPES`` (measured: benchmarks/cpu_matmul.py); a layer whose parts are
all of those types stays on the integer kernels at every row count."""

NATIVE_TILE_BYTES = 4 << 20
"""fp32 bytes of one dequantized weight tile on the native prompt path (stays in L2/L3)."""


def _kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``quant_matmul`` and ``dequantize_weight``, imported on first use: their modules
    import Triton (optional on CPU installs) and decorate kernels on import, which must come
    after the interpreter switch is set."""
    from rocmforge.kernels.gguf_dequant import dequantize_weight
    from rocmforge.kernels.quant_matmul import quant_matmul

    return quant_matmul, dequantize_weight


@dataclass(frozen=True, slots=True)
class _Segment:
    """One weight buffer: its name, type and the output columns ``[start, stop)`` it fills."""

    name: str
    ggml_type: GGMLQuantizationType
    start: int
    stop: int


class GGUFLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` kept as GGUF blocks and decoded inside the matmul."""

    @staticmethod
    def supports(ggml_type: GGMLQuantizationType | int, in_features: int, kernels: LinearKernels = "triton") -> bool:
        """Whether a part of ``ggml_type`` with rows of ``in_features`` can be served (the
        kernels available, a type they compute on, whole blocks per row)."""
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            return False
        if kernels == "native":
            if not native.available() or qtype not in native.NATIVE_TYPES:
                return False
        else:
            if not triton_available():
                return False
            from rocmforge.kernels.quant_matmul import SUPPORTED_TYPES  # see _kernels

            if qtype not in SUPPORTED_TYPES:
                return False
        return in_features > 0 and in_features % GGML_QUANT_SIZES[qtype][0] == 0

    def __init__(
        self,
        parts: Sequence[tuple[torch.Tensor, GGMLQuantizationType]],
        in_features: int,
        bias: torch.Tensor | None = None,
        *,
        kernels: LinearKernels = "triton",
    ) -> None:
        super().__init__()
        if not parts:
            raise ValueError("GGUFLinear needs at least one weight part")
        if kernels not in ("triton", "native"):
            raise ValueError(f"unknown kernels {kernels!r} (have: triton, native)")
        self.in_features = in_features
        self.kernels = kernels
        merged: list[tuple[GGMLQuantizationType, list[torch.Tensor]]] = []
        for index, (data, ggml_type) in enumerate(parts):
            qtype = self._check_part(index, data, ggml_type, in_features, kernels)
            if merged and merged[-1][0] == qtype and kernels == "triton":
                merged[-1][1].append(data)
            else:
                merged.append((qtype, [data]))

        segments: list[_Segment] = []
        start = 0
        for index, (qtype, tensors) in enumerate(merged):
            name = f"weight_{index}"
            buffer = tensors[0].contiguous() if len(tensors) == 1 else torch.cat(tensors)
            self.register_buffer(name, buffer, persistent=False)
            segments.append(_Segment(name, qtype, start, start + buffer.shape[0]))
            start += buffer.shape[0]
        self._segments = tuple(segments)
        self._types = [int(s.ggml_type) for s in segments]
        self._integer_gemm = all(t in native.INTEGER_GEMM_TYPES for t in self._types)
        self.out_features = start

        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}"
            )
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def _check_part(
        cls,
        index: int,
        data: torch.Tensor,
        ggml_type: GGMLQuantizationType | int,
        in_features: int,
        kernels: LinearKernels,
    ) -> GGMLQuantizationType:
        if not cls.supports(ggml_type, in_features, kernels):
            raise ValueError(
                f"part {index}: type {ggml_type!r} with in_features={in_features} "
                f"is not supported by the {kernels} quantized matmul kernels"
            )
        qtype = GGMLQuantizationType(ggml_type)
        block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
        row_bytes = in_features // block_elements * block_bytes
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes:
            raise ValueError(
                f"part {index}: expected a uint8 [rows, {row_bytes}] tensor of {qtype.name} "
                f"rows of {in_features} elements, got {data.dtype} of shape "
                f"{tuple(data.shape)}"
            )
        return qtype

    @property
    def weight_bytes(self) -> int:
        """Bytes of quantized weight held (bias excluded)."""
        return sum(getattr(self, s.name).numel() for s in self._segments)

    def forward(self, x: torch.Tensor, *, dense_min_rows: int | None = None) -> torch.Tensor:
        """``[..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``; per weight buffer
        one quantized-matmul launch, or from ``dense_min_rows`` rows on a dequantization and
        a BLAS GEMM (natively, only for types outside ``native.INTEGER_GEMM_TYPES``).
        RuntimeError where the kernels cannot run on ``x.device``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input [..., {self.in_features}], got shape {tuple(x.shape)}"
            )
        if self.kernels == "native":
            return self._forward_native(x, dense_min_rows or NATIVE_DENSE_MIN_ROWS)
        dense_min_rows = dense_min_rows or DENSE_MIN_ROWS
        quant_matmul, dequantize_weight = _kernels()
        rows = x.reshape(-1, self.in_features)
        out = torch.empty((rows.shape[0], self.out_features), dtype=x.dtype, device=x.device)
        for segment in self._segments:
            weight = getattr(self, segment.name)
            target = out[:, segment.start : segment.stop]
            if rows.shape[0] >= dense_min_rows:
                dense = dequantize_weight(weight, segment.ggml_type, self.in_features, x.dtype)
                if target.is_contiguous():  # one buffer: the GEMM writes the output directly
                    torch.mm(rows, dense.T, out=target)
                else:
                    target.copy_(rows @ dense.T)
            else:
                quant_matmul(rows, weight, segment.ggml_type, out=target)
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def native_operands(self) -> tuple[list[torch.Tensor], list[int]]:
        """The weight parts and their ggml types, as the native ``matmul`` takes them."""
        return [getattr(self, s.name) for s in self._segments], list(self._types)

    def _forward_native(self, x: torch.Tensor, dense_min_rows: int) -> torch.Tensor:
        ops = native.ops()
        if ops is None:
            raise RuntimeError(f"native CPU kernels unavailable: {native.unavailable_reason()}")
        rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        out = torch.empty((rows.shape[0], self.out_features), dtype=torch.float32)
        weights, _ = self.native_operands()
        if rows.shape[0] >= dense_min_rows and not self._integer_gemm:
            tile_rows = max(1, NATIVE_TILE_BYTES // (4 * self.in_features))
            ops.matmul_dequant(rows, weights, self._types, out, tile_rows)
        else:
            ops.matmul(rows, weights, self._types, out)
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in ``dtype`` (the reference)."""
        blocks = [
            dequantize(
                getattr(self, s.name).reshape(-1),
                s.ggml_type,
                (s.stop - s.start, self.in_features),
                dtype,
            )
            for s in self._segments
        ]
        return torch.cat(blocks)

    def extra_repr(self) -> str:
        types = "|".join(f"{s.ggml_type.name}[{s.stop - s.start}]" for s in self._segments)
        return f"in_features={self.in_features}, out_features={self.out_features}, types={types}, kernels={self.kernels}"
