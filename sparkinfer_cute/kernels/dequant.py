"""Dequantize a GGUF-quantized tensor (raw GGUF bytes on the GPU) to f32, bit-exact with gguf-py / ggml.

One thread decodes one unit (see quant_decode.py: 32 or 64 elements) with the exact (``mul.rn``/``sub.rn``, never
contracted) arithmetic and stores it with vector stores. Used for weights that are needed dense (embedding rows,
tests, debugging); the matmul paths decode in registers instead.

    y = dequantize(raw_u8, "Q4_K")            # numpy in -> numpy out, shape (n_elems,)
    ref = dequantize_ref(raw_u8, "Q4_K")      # gguf.quants.dequantize (the independent reference)
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import numpy as np
from cutlass import Float32, Int32, Uint8, cute

from .arch import pdl_enabled
from .common import pdl_prologue
from .compile import kernel_cache
from .quant_decode import (
    copy_runs_to_gmem,
    decode_unit,
    kernel_options,
    new_unit_buffer,
    qtype_name,
    run_divisibility,
    spec,
    unit_base,
)

THREADS = 128


class Dequant:
    def __init__(self, qtype: str):
        self.pdl = pdl_enabled()
        self.qtype = qtype
        self.sp = spec(qtype)

    @cute.jit
    def __call__(self, pW: cute.Pointer, pY: cute.Pointer, n_units: Int32, stream: cuda.CUstream):
        self.kernel(pW, pY, n_units).launch(
            grid=[cute.ceil_div(n_units, THREADS), 1, 1], block=[THREADS, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pY: cute.Pointer, n_units: Int32):
        pdl_prologue(self.pdl)
        sp = self.sp
        tid = cute.arch.thread_idx()[0]
        bid = cute.arch.block_idx()[0]
        U = bid * THREADS + tid
        if U < n_units:
            upb = sp.units_per_block
            blk = U // upb
            u = U - blk * upb
            vals = new_unit_buffer(self.qtype)
            decode_unit(self.qtype, pW, blk, u, vals, exact=True)
            copy_runs_to_gmem(sp, vals, pY, blk * sp.block_elems + unit_base(sp, u), run_divisibility(sp))


def _ptr(dtype, addr, align=16):
    return cute.runtime.make_ptr(dtype, addr, cute.AddressSpace.gmem, assumed_align=align)


@kernel_cache
def compile_dequant(qtype: str):
    return cute.compile(Dequant(qtype), _ptr(Uint8, 0), _ptr(Float32, 0), Int32(1),
                        cute.runtime.make_fake_stream(), options=kernel_options())


def dequantize(raw, qtype, n_elems: int | None = None, out=None, stream=None):
    """Dequantize raw GGUF bytes (numpy uint8 array or DeviceArray) of type ``qtype`` to f32.

    numpy in -> numpy out (flat f32 array); DeviceArray in -> DeviceArray out (``out`` if given)."""
    from ..runtime import DeviceArray, default_stream
    from .gemv import as_device_bytes

    q = qtype_name(qtype)
    sp = spec(q)
    was_numpy = not isinstance(raw, DeviceArray)
    w = as_device_bytes(raw, stream)
    nbytes = w.nbytes
    if nbytes % sp.block_bytes:
        raise ValueError(f"{q}: {nbytes} bytes is not a whole number of {sp.block_bytes}-byte blocks")
    n_blocks = nbytes // sp.block_bytes
    n = n_blocks * sp.block_elems if n_elems is None else n_elems
    if n != n_blocks * sp.block_elems:
        raise ValueError(f"{q}: n_elems {n} != {n_blocks} blocks * {sp.block_elems}")
    y = out if out is not None else DeviceArray.empty((n,), np.float32)
    st = stream if stream is not None else default_stream()
    fn = compile_dequant(q)
    fn(_ptr(Uint8, w.ptr), _ptr(Float32, y.ptr), Int32(n_blocks * sp.units_per_block), cuda.CUstream(st.handle))
    if was_numpy:
        return y.to_numpy(stream=st)
    return y


def repack_q6_k_padded(raw: np.ndarray) -> np.ndarray:
    """Upload-time repack of raw Q6_K bytes into the Q6_K_P layout: every 210-byte block followed by 2 zero bytes
    (212 = 53 32-bit words), so every field of every block is 4-byte aligned and the kernels read it with 32-bit
    instead of 16-bit loads, for +0.95% bytes. Value-exact: ``unpack_q6_k_padded`` inverts it. Keeps the leading
    shape; the last axis (bytes) grows by 212/210."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    b = raw.reshape(-1, 210)
    out = np.zeros((b.shape[0], 212), np.uint8)
    out[:, :210] = b
    return out.reshape(*lead, raw.shape[-1] // 210 * 212)


def unpack_q6_k_padded(packed: np.ndarray) -> np.ndarray:
    p = np.ascontiguousarray(packed, dtype=np.uint8)
    b = p.reshape(-1, 212)
    return np.ascontiguousarray(b[:, :210]).reshape(*p.shape[:-1], p.shape[-1] // 212 * 210)


def dequantize_ref(raw: np.ndarray, qtype) -> np.ndarray:
    """Independent reference: gguf-py's numpy dequantizer on the original bytes (flat f32). Q6_K_P bytes are
    unpadded back to Q6_K first."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    q = qtype_name(qtype)
    if q == "Q6_K_P":
        raw, q = unpack_q6_k_padded(np.asarray(raw, dtype=np.uint8).reshape(-1)), "Q6_K"
    return gguf_dequantize(np.asarray(raw, dtype=np.uint8).reshape(-1), GGMLQuantizationType[q]).astype(
        np.float32).reshape(-1)


def random_quant_bytes(qtype, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random blocks of ``qtype`` (uint8, shape (n_blocks, block_bytes)): random quant bits, finite f16 scales.

    The f16 scale fields get |N(0, scale)|-ish finite values (d may be negative: ggml never forbids it), so the
    decoded values are finite and span many exponents. Float types get random finite values."""
    q = qtype_name(qtype)
    sp = spec(q)
    if q == "Q6_K_P":
        return repack_q6_k_padded(random_quant_bytes("Q6_K", n_blocks, rng, scale))
    if q in ("F16", "BF16", "F32"):
        v = (rng.standard_normal(n_blocks * 32) * scale).astype(np.float32)
        if q == "F16":
            b = v.astype(np.float16).view(np.uint8)
        elif q == "BF16":
            b = (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            b = v.view(np.uint8)
        return b.reshape(n_blocks, sp.block_bytes).copy()
    raw = rng.integers(0, 256, size=(n_blocks, sp.block_bytes), dtype=np.uint8)

    def halves(k):
        return (rng.standard_normal((n_blocks, k)) * scale * 0.05).astype(np.float16).view(np.uint8)

    if q == "Q6_K":
        raw[:, 208:210] = halves(1)
    elif q in ("Q4_K", "Q5_K"):
        raw[:, 0:4] = halves(2)
    else:
        raw[:, 0:2] = halves(1)
    return raw


def _register():
    try:
        from .registry import register
    except ImportError:  # registry.py is owned by another module; absent in early checkouts
        return
    register("dequant", compile_dequant, [dict(qtype=q) for q in ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K",
                                                                      "Q6_K", "Q6_K_P", "F16", "BF16")])


_register()
