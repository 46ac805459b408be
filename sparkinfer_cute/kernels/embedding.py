"""Embedding gather: dequantize the row of a (quantized) token-embedding matrix selected by a token id that lives in
device memory, times a scale (Gemma multiplies by sqrt(n_embd)), into f32.

One row per decode step is a few KB, so this kernel is written for clarity: one thread per output element decodes
its own value from the raw GGUF block (formulas of models.md §5, in the same f32 evaluation order as ggml's
``dequantize_row_*``). The token id is read on the device so the kernel can live inside the captured decode graph.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float16, Float32, Int32, Int64, Uint8, Uint32, const_expr
from cutlass.cute.runtime import make_fake_stream
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import gptr, pdl_prologue
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

Q = GGMLQuantizationType


def _u8(x):
    """uint8 -> Int32, zero-extended. NB: in nvidia-cutlass-dsl 4.8.1 a plain ``Int32(<Uint8 value>)`` SIGN-extends
    (PTX shows ld.global.s8 + shr.s16; checked in the dumped PTX), which corrupts every byte >= 0x80."""
    return Int32(Uint32(x))


EMBED_TYPES = ("F32", "F16", "Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q6_K")


class EmbeddingGather:
    """out[t, i] = scale * dequant(W[ids[slot + t]])[i] for i < n_embd, t < n_tokens (grid.y: one row each)."""

    def __init__(self, qtype: str, n_embd: int, threads: int = 256):
        self.pdl = pdl_enabled()
        assert qtype in EMBED_TYPES, qtype
        self.qtype = qtype
        self.n_embd = n_embd
        self.threads = threads
        qk, nb = GGML_QUANT_SIZES[Q[qtype]]
        assert n_embd % qk == 0
        self.qk, self.block_bytes = qk, nb
        self.row_bytes = n_embd // qk * nb

    @cute.jit
    def __call__(self, p_w: cute.Pointer, p_ids: cute.Pointer, p_out: cute.Pointer, n_rows: Int32, slot: Int32,
                 scale: Float32, n_tokens: Int32, stream: cuda.CUstream):
        nbytes = Int64(n_rows) * self.row_bytes
        mW = cute.make_tensor(p_w, cute.make_layout(nbytes))
        mW16 = cute.make_tensor(cute.recast_ptr(p_w, dtype=Float16), cute.make_layout(nbytes // 2))
        mIds = cute.make_tensor(p_ids, cute.make_layout(slot + n_tokens))
        mOut = cute.make_tensor(p_out, cute.make_layout(self.n_embd * n_tokens))
        self.kernel(mW, mW16, mIds, mOut, slot, scale).launch(
            use_pdl=self.pdl, grid=[(self.n_embd + self.threads - 1) // self.threads, n_tokens, 1],
            block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mW16: cute.Tensor, mIds: cute.Tensor, mOut: cute.Tensor, slot: Int32,
               scale: Float32):
        pdl_prologue(self.pdl)
        tidx, _, _ = cute.arch.thread_idx()
        bidx, row_t, _ = cute.arch.block_idx()
        i = bidx * self.threads + tidx
        if i < self.n_embd:
            tok = Int64(mIds[slot + row_t])
            row = tok * self.row_bytes
            b = i // self.qk
            t = i - b * self.qk
            base = row + b * self.block_bytes  # byte offset of this element's block
            v = Float32(0.0)
            if const_expr(self.qtype == "F32"):
                v = cute.make_tensor(cute.recast_ptr(mW.iterator + base, dtype=Float32), cute.make_layout(1))[0]
            elif const_expr(self.qtype == "F16"):
                v = Float32(mW16[base // 2])
            elif const_expr(self.qtype == "Q8_0"):
                d = Float32(mW16[base // 2])
                q = Int32(cutlass.Int8(mW[base + 2 + t]))
                v = d * Float32(q)
            elif const_expr(self.qtype == "Q4_0"):
                d = Float32(mW16[base // 2])
                j = t % 16
                byte = _u8(mW[base + 2 + j])
                q = (byte & 0xF) if t < 16 else (byte >> 4)
                v = d * Float32(q - 8)
            elif const_expr(self.qtype == "Q5_0"):
                d = Float32(mW16[base // 2])
                qh = (_u8(mW[base + 2]) | (_u8(mW[base + 3]) << 8) | (_u8(mW[base + 4]) << 16)
                      | (_u8(mW[base + 5]) << 24))
                j = t % 16
                byte = _u8(mW[base + 6 + j])
                lo = (byte & 0xF) if t < 16 else (byte >> 4)
                hi = ((qh >> t) & 1) << 4
                v = d * Float32((lo | hi) - 16)
            elif const_expr(self.qtype == "Q4_K"):
                d = Float32(mW16[base // 2])
                dmin = Float32(mW16[base // 2 + 1])
                c = t // 64           # 64-element chunk
                l = t % 32
                hi_nib = (t % 64) >= 32
                sidx = 2 * c + (1 if hi_nib else 0)
                sc, m = self._scale_min_k4(mW, base + 4, sidx)
                byte = _u8(mW[base + 16 + 32 * c + l])
                q = (byte >> 4) if hi_nib else (byte & 0xF)
                v = d * Float32(sc) * Float32(q) - dmin * Float32(m)
            elif const_expr(self.qtype == "Q6_K"):
                d = Float32(mW16[base // 2 + 104])  # d is the last 2 bytes of the 210-byte block
                n = t // 128
                r = t % 128
                quarter = r // 32      # which of q1..q4
                l = r % 32
                ql_off = base + 64 * n + l + (32 if (quarter % 2) == 1 else 0)
                lbyte = _u8(mW[ql_off])
                low = (lbyte >> 4) if quarter >= 2 else (lbyte & 0xF)
                hbyte = _u8(mW[base + 128 + 32 * n + l])
                high = (hbyte >> (2 * quarter)) & 3
                q = (low | (high << 4)) - 32
                s = Int32(cutlass.Int8(mW[base + 192 + 8 * n + l // 16 + 2 * quarter]))
                v = d * Float32(s) * Float32(q)
            mOut[row_t * self.n_embd + i] = v * scale

    @cute.jit
    def _scale_min_k4(self, mW: cute.Tensor, sbase, j):
        """get_scale_min_k4 of ggml-quants.c on the 12 scale bytes at ``sbase``."""
        sc = Int32(0)
        m = Int32(0)
        if j < 4:
            sc = _u8(mW[sbase + j]) & 63
            m = _u8(mW[sbase + j + 4]) & 63
        else:
            sc = (_u8(mW[sbase + j + 4]) & 0xF) | ((_u8(mW[sbase + j - 4]) >> 6) << 4)
            m = (_u8(mW[sbase + j + 4]) >> 4) | ((_u8(mW[sbase + j]) >> 6) << 4)
        return sc, m


@kernel_cache
def compile_embedding(qtype: str, n_embd: int):
    pw = gptr(Uint8, 0, 4)
    pi = gptr(Int32, 0, 4)
    po = gptr(Float32, 0)
    return cute.compile(EmbeddingGather(qtype, n_embd), pw, pi, po, Int32(1), Int32(0), Float32(1.0), Int32(1),
                        make_fake_stream(), options=compile_options())


def embedding(weight, ids, out=None, *, qtype: str, n_embd: int, slot: int = 0, scale: float = 1.0, n_tokens: int = 1,
              stream=None):
    """Gather row ids[slot] of a raw GGUF embedding matrix (uint8 rows) into f32 [n_embd] (numpy in -> numpy out);
    with ``n_tokens`` > 1 the rows of ids[slot .. slot + n_tokens) into [n_tokens, n_embd]."""
    from ..runtime import DeviceArray, as_device, default_stream

    stream = stream or default_stream()
    w, w_np = as_device(weight, stream)
    i, _ = as_device(np.asarray(ids, dtype=np.int32) if isinstance(ids, (list, tuple)) else ids, stream)
    o = out if out is not None else DeviceArray.empty((n_embd,) if n_tokens == 1 else (n_tokens, n_embd), np.float32)
    n_rows = w.nbytes // (n_embd // GGML_QUANT_SIZES[Q[qtype]][0] * GGML_QUANT_SIZES[Q[qtype]][1])
    f = compile_embedding(qtype, n_embd)
    f(gptr(Uint8, w.ptr, 4),
      gptr(Int32, i.ptr, 4),
      gptr(Float32, o.ptr),
      Int32(n_rows), Int32(slot), Float32(scale), Int32(n_tokens), cuda.CUstream(stream.handle))
    return o.to_numpy(stream) if w_np else o


register("embedding", compile_embedding, [
    dict(qtype="Q4_K", n_embd=2048),   # Qwen3-30B-A3B token_embd
    dict(qtype="Q8_0", n_embd=640),    # Gemma 3 270M token_embd
    dict(qtype="Q6_K", n_embd=2048),
    dict(qtype="Q5_0", n_embd=640),
    dict(qtype="Q4_0", n_embd=256),
    dict(qtype="F16", n_embd=256),
    dict(qtype="F32", n_embd=256),
    dict(qtype="Q4_K", n_embd=256),    # tiny synthetic
    dict(qtype="Q6_K", n_embd=2816),   # Gemma 4 26B-A4B token_embd (tied LM head)
    dict(qtype="Q6_K", n_embd=256),    # synthetic gemma4 tiny
])
