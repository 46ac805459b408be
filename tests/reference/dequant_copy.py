"""Write an all-F32 copy of a GGUF file: every tensor dequantized (exactly), metadata copied with its types.

Why: llama.cpp's CPU backend quantizes activations to Q8_0/Q8_K before every quantized matmul (and runs attention
with fp16 accumulations). On the synthetic random-weight models those roundings alone move llama.cpp's own logits by
a few % relative RMS (measured: llama.cpp FA-on vs FA-off on synth qwen3moe/tiny, 2-12 %), which hides any error in
the model math. With F32 weights ``vec_dot_type`` is F32, so llama.cpp's matmuls see the exact dequantized weights
and exact activations, and a comparison with our reference tests the model math itself. The weights are the very
values the quantized file holds, so nothing else changes.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from sparkinfer_cute.gguf.reader import GGUFFile


def write_dequantized_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    r = GGUFReader(os.fspath(src), "r")
    g = GGUFFile(src)
    w = GGUFWriter(os.fspath(dst), g.architecture)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_key_value(key, 0, GGUFValueType.UINT32)  # LLAMA_FTYPE_ALL_F32
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for name in g.tensors:
        w.add_tensor(name, np.ascontiguousarray(g.dequant(name), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(dst)
