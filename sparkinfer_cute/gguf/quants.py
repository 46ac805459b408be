"""Vectorized numpy dequantization of the GGUF quant types this package supports.

Bit-exact with ``gguf.quants.dequantize`` (gguf-py 0.19.0), which the tests check on random blocks and on
every tensor of the real Gemma 3 270M file. Bit-exactness depends on the float32 evaluation order, which
follows gguf-py:

- Q4_0 / Q5_0 / Q8_0: ``d * q`` (one rounding).
- Q4_K / Q5_K: ``(d*sc) * q - (dmin*m)`` — ``d*sc`` and ``dmin*m`` are rounded to f32 first, then the product,
  then the difference (numpy never fuses these into an FMA).
- Q6_K: ``(d*sc) * q``.
- F16 -> F32 is exact; BF16 -> F32 is a 16-bit shift.

Integer unpacking stays in uint8 and every type is a handful of whole-array numpy operations written in place
into the output (chunks of ~8 MB of blocks bound the temporaries), with no per-block Python work.

Block layouts (ggml-common.h; models.md §5 of the project spec):
Q4_0 {d f16, qs[16]}, Q5_0 {d f16, qh u32, qs[16]}, Q8_0 {d f16, qs i8[32]},
Q4_K {d, dmin f16, scales[12], qs[128]}, Q5_K {d, dmin, scales[12], qh[32], qs[128]},
Q6_K {ql[128], qh[64], sc i8[16], d}.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType

# (elements per block, bytes per block) for every supported type (ggml-common.h; matches
# gguf.GGML_QUANT_SIZES).
QUANT_BLOCK: dict[GGMLQuantizationType, tuple[int, int]] = {
    Q.F32: (1, 4),
    Q.F16: (1, 2),
    Q.BF16: (1, 2),
    Q.Q4_0: (32, 18),
    Q.Q5_0: (32, 22),
    Q.Q8_0: (32, 34),
    Q.Q4_K: (256, 144),
    Q.Q5_K: (256, 176),
    Q.Q6_K: (256, 210),
}
BLOCK_ELEMS = {t: be for t, (be, _) in QUANT_BLOCK.items()}
BLOCK_BYTES = {t: bb for t, (_, bb) in QUANT_BLOCK.items()}
SUPPORTED = frozenset(QUANT_BLOCK)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian fp16 at byte ``offset`` of every block, as float32 (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(np.float16)[:, 0].astype(np.float32)


# ------------------------------------------------------------------------------------------- per-type kernels
# Each takes b = (n_blocks, block_bytes) uint8 and writes out = (n_blocks, block_elems) float32 in place.
# Integer unpacking stays in uint8; the uint8 -> float32 conversion happens in the assignment to ``out``
# and the scale multiplies run in place (measured on the 2-core dev box: 2-5x faster than gguf-py, and ~4x
# faster than float32 lookup-table gathers).
def _deq_f32(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = np.ascontiguousarray(b).view(np.float32)


def _deq_f16(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = np.ascontiguousarray(b).view(np.float16)


def _deq_bf16(b: np.ndarray, out: np.ndarray) -> None:
    out.view(np.uint32)[...] = np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16


def _deq_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _f16(b, 0)
    qs = b[:, 2:18]
    out[:, :16] = qs & 0x0F  # y[j] = low(qs[j]) - 8
    out[:, 16:] = qs >> 4  # y[j+16] = high(qs[j]) - 8
    out -= 8.0  # exact: small integers
    out *= d[:, None]


def _deq_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _f16(b, 0)
    hbits = np.unpackbits(b[:, 2:6], axis=1, bitorder="little") << 4  # (nb, 32): bit j of qh, as 0 / 16
    qs = b[:, 6:22]
    out[:, :16] = (qs & 0x0F) | hbits[:, :16]
    out[:, 16:] = (qs >> 4) | hbits[:, 16:]
    out -= 16.0
    out *= d[:, None]


def _deq_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = b[:, 2:34].view(np.int8)
    out *= _f16(b, 0)[:, None]  # gguf-py computes x * d (same product)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7 on (nb, 12) scale bytes -> (sc, m) as float32 (nb, 8)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_apply_scale_min(b: np.ndarray, out3: np.ndarray) -> None:
    """out3 (nb, 8, 32) holds q; apply y = (d*sc) * q - (dmin*m) per 32-element sub-block, in gguf-py's
    order."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scale_min(b[:, 4:16])
    out3 *= (d[:, None] * sc)[:, :, None]
    out3 -= (dmin[:, None] * m)[:, :, None]


def _deq_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    out3 = out.reshape(-1, 8, 32)
    qs = b[:, 16:144].reshape(-1, 4, 32)  # chunk c feeds sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
    out3[:, 0::2] = qs & 0x0F
    out3[:, 1::2] = qs >> 4
    _k_apply_scale_min(b, out3)


_BIT_SHIFTS_8 = np.arange(8, dtype=np.uint8)[None, :, None]


def _deq_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    out3 = out.reshape(-1, 8, 32)
    hbit = ((b[:, None, 16:48] >> _BIT_SHIFTS_8) & 1) << 4  # (nb, 8, 32): sub-block s uses bit s of qh[l]
    qs = b[:, 48:176].reshape(-1, 4, 32)
    out3[:, 0::2] = (qs & 0x0F) | hbit[:, 0::2]
    out3[:, 1::2] = (qs >> 4) | hbit[:, 1::2]
    _k_apply_scale_min(b, out3)


_Q6_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


def _deq_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    # Per half n (128 outputs), quarter k (32 outputs): low 4 bits from ql[64n + 32*(k%2) + l] (low nibble for
    # k < 2, high nibble for k >= 2), high 2 bits from bits 2k..2k+1 of qh[32n + l].
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)
    hi = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> _Q6_SHIFTS) & 3) << 4  # (nb, 2, 4, 32)
    out4 = out.reshape(-1, 2, 4, 32)
    out4[:, :, 0:2] = (ql & 0x0F) | hi[:, :, 0:2]
    out4[:, :, 2:4] = (ql >> 4) | hi[:, :, 2:4]
    out -= 32.0
    dsc = _f16(b, 208)[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)  # (nb, 16): per 16 outputs
    out.reshape(-1, 16, 16)[...] *= dsc[:, :, None]


_KERNELS = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q4_0: _deq_q4_0,
    Q.Q5_0: _deq_q5_0,
    Q.Q8_0: _deq_q8_0,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
}

# Blocks processed per kernel call: bounds the temporaries (a few float32 copies of a chunk) to ~10s of MB.
_CHUNK_BYTES = 8 << 20


def _as_bytes(raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        if raw.ndim == 0:
            raise ValueError("dequantize needs an array of bytes, got a scalar")
        raw = np.ascontiguousarray(raw)
        raw = raw.view(np.uint8).reshape(*raw.shape[:-1], raw.shape[-1] * raw.dtype.itemsize)
    if raw.ndim == 0:
        raise ValueError("dequantize needs an array of bytes, got a scalar")
    return raw


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """Dequantize ``raw`` (uint8, any leading shape, last dim = bytes per row; a 1-D byte array is one row) of
    type ``qtype`` to float32 of shape ``(*leading, elements_per_row)``. Non-uint8 input is reinterpreted as
    its bytes.

    Raises ValueError for an unsupported type or a row length that is not a whole number of blocks.
    """
    qtype = Q(int(qtype))
    if qtype not in _KERNELS:
        raise ValueError(
            f"no numpy dequantizer for {qtype.name} (supported: {', '.join(t.name for t in QUANT_BLOCK)})"
        )
    be, bb = QUANT_BLOCK[qtype]
    raw = _as_bytes(raw)
    row_bytes = raw.shape[-1]
    if row_bytes % bb:
        raise ValueError(f"{qtype.name}: row of {row_bytes} bytes is not a whole number of {bb}-byte blocks")
    lead = raw.shape[:-1]
    n_per_row = row_bytes // bb * be
    blocks = np.ascontiguousarray(raw).reshape(-1, bb)
    nb = blocks.shape[0]
    out = np.empty((nb, be), dtype=np.float32)
    step = max(1, _CHUNK_BYTES // bb)
    kernel = _KERNELS[qtype]
    # inf/NaN scales in random or corrupt data are reproduced, not warned about
    with np.errstate(all="ignore"):
        for s in range(0, nb, step):
            kernel(blocks[s : s + step], out[s : s + step])
    return out.reshape(*lead, n_per_row)


def dequantize_rows(raw_2d: np.ndarray, rows_idx, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """Dequantize only the selected rows of a (n_rows, row_bytes) byte matrix (e.g. token embedding lookups,
    or one expert's rows of a (n_expert, n_out, row_bytes) view).
    Returns (*shape(rows_idx), elements_per_row).
    """
    idx = np.asarray(rows_idx, dtype=np.int64)
    return dequantize(np.asarray(raw_2d)[idx], qtype)


def quant_row_bytes(qtype: GGMLQuantizationType | int, n_elements: int) -> int:
    """Bytes of a row of ``n_elements`` (must be a multiple of the block size)."""
    be, bb = QUANT_BLOCK[Q(int(qtype))]
    if n_elements % be:
        raise ValueError(
            f"{Q(int(qtype)).name}: {n_elements} elements is not a multiple of the block size {be}"
        )
    return n_elements // be * bb


# ------------------------------------------------------------------------------------------- Q6_K_P (upload-time repack)
# Q6_K blocks are 210 bytes, so their fields are only 2-byte aligned and the GPU reads them with 16-bit loads. Q6_K_P
# is the same block followed by 2 zero bytes (212 = 53 32-bit words): every field of every block is 4-byte aligned,
# the kernels read it with 32-bit loads, for +0.95% bytes. Value-exact (the padding is never read as data).
Q6_K_BLOCK_BYTES = 210
Q6_K_P_BLOCK_BYTES = 212


def repack_q6_k_padded(raw: np.ndarray) -> np.ndarray:
    """Raw Q6_K bytes -> the Q6_K_P layout (every 210-byte block followed by 2 zero bytes). Keeps the leading shape;
    the last axis (bytes) grows by 212/210. :func:`unpack_q6_k_padded` inverts it."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    b = raw.reshape(-1, Q6_K_BLOCK_BYTES)
    out = np.zeros((b.shape[0], Q6_K_P_BLOCK_BYTES), np.uint8)
    out[:, :Q6_K_BLOCK_BYTES] = b
    return out.reshape(*lead, raw.shape[-1] // Q6_K_BLOCK_BYTES * Q6_K_P_BLOCK_BYTES)


def unpack_q6_k_padded(packed: np.ndarray) -> np.ndarray:
    """Q6_K_P bytes -> the original Q6_K bytes (drops the 2 padding bytes of every block)."""
    p = np.ascontiguousarray(packed, dtype=np.uint8)
    b = p.reshape(-1, Q6_K_P_BLOCK_BYTES)
    return np.ascontiguousarray(b[:, :Q6_K_BLOCK_BYTES]).reshape(
        *p.shape[:-1], p.shape[-1] // Q6_K_P_BLOCK_BYTES * Q6_K_BLOCK_BYTES)


__all__ = [
    "QUANT_BLOCK",
    "BLOCK_ELEMS",
    "BLOCK_BYTES",
    "SUPPORTED",
    "dequantize",
    "dequantize_rows",
    "quant_row_bytes",
    "repack_q6_k_padded",
    "unpack_q6_k_padded",
]
