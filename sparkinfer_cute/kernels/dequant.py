"""Dequantize a GGUF-quantized tensor (raw GGUF bytes on the GPU) to f32, bit-exact with gguf-py / ggml.

One thread decodes one unit (see quant_decode.py: 32 or 64 elements) with the exact (``mul.rn``/``sub.rn``, never
contracted) arithmetic and stores it with vector stores. Used for weights that are needed dense (embedding rows,
tests, debugging); the matmul paths decode in registers instead.

    y = dequantize(raw_u8, "Q4_K")            # numpy in -> numpy out, shape (n_elems,)
    ref = kernel_refs.dequantize_ref(raw_u8, "Q4_K")   # gguf-py's dequantize (sparkinfer_cute/reference)
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import numpy as np
from cutlass import Float32, Int32, Uint8, cute

from .arch import pdl_enabled
from .common import gptr, pdl_prologue
from .compile import compile_options, kernel_cache
from .registry import register
from .quant_decode import (
    decode_unit,
    new_unit_buffer,
    qtype_name,
    run_divisibility,
    spec,
    unit_base,
)

THREADS = 128


def copy_runs_to_gmem(sp, vals, pY, gbase, divby: int):
    """Store a decoded unit (``vals``, rmem) to global memory at element ``gbase`` + the unit's run offsets."""
    for start, off, n in sp.runs:
        tmp = cute.make_rmem_tensor((n,), vals.element_type)
        for i in range(n):
            tmp[i] = vals[start + i]
        dst = cute.make_tensor(pY + cute.assume(gbase + off, divby=divby), cute.make_layout(n))
        cute.autovec_copy(tmp, dst)


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


@kernel_cache
def compile_dequant(qtype: str):
    return cute.compile(Dequant(qtype), gptr(Uint8, 0), gptr(Float32, 0), Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


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
    fn(gptr(Uint8, w.ptr), gptr(Float32, y.ptr), Int32(n_blocks * sp.units_per_block), cuda.CUstream(st.handle))
    if was_numpy:
        return y.to_numpy(stream=st)
    return y


register("dequant", compile_dequant,
         [dict(qtype=q) for q in ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q6_K_P", "F16", "BF16")])
