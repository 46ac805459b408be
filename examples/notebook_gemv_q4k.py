"""Notebook-style: a quantized decode GEMV on real GGUF weights, against its float64 reference, in three lines.

    python examples/notebook_gemv_q4k.py [MODEL.gguf]   (default: the packaged Gemma 3 270M)

On a machine with a supported CUDA GPU the product runs in the CuTe DSL kernel (``sparkinfer_cute.kernels.gemv``)
straight from the GGUF's Q4_K bytes. Without one, the same three lines run with the product done in float32 numpy on
the dequantized weights (what the CPU backend computes), and the script says so.
"""

import sys

import numpy as np

from sparkinfer_cute.engine import default_model_path, gpu_usable
from sparkinfer_cute.gguf import GGUFFile

path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
g = GGUFFile(path)
t = g.tensor("blk.0.attn_output.weight")  # Q4_K in the Gemma 3 270M Q4_K_M file
W = g.raw(t.name)                          # zero-copy uint8 view of the GGUF rows: [n_out, row_bytes]
x = np.random.default_rng().standard_normal(t.shape[0]).astype(np.float32)
on_gpu, why = gpu_usable()
if on_gpu:
    from sparkinfer_cute.kernels.gemv import gemv

    def product(W, qtype, x):
        return gemv(W, qtype, x)  # the CuTe DSL kernel, on the GPU, from the quantized bytes

    print(f"GPU: {why}")
else:
    def product(W, qtype, x):
        return g.dequant(t.name) @ x  # float32 numpy on the exactly dequantized weights

    print(f"{why}: the product runs in float32 numpy instead of the GPU kernel")

# %% the three lines: numpy in -> numpy out, float64 reference, relative error
y = product(W, t.ggml_type.name, x)
ref = g.dequant(t.name).astype(np.float64) @ x.astype(np.float64)
err = np.abs(y - ref).max() / np.abs(ref).max()
print(f"{t.name} {t.ggml_type.name} {t.shape}: rel err {err:.2e} ({'GPU kernel' if on_gpu else 'numpy float32'} "
      f"vs float64 reference)")
assert err < 1e-3
