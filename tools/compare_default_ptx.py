"""Does an edit change the default build's generated code? Compiles a few kernel configs (no GPU needed) in the
working tree and in a git revision, and compares their PTX; also compiles a tuned variant of each (a knob the
autotuner sets) to show it is a different kernel.

    CUTE_DSL_ARCH=sm_120a python tools/compare_default_ptx.py REV      # e.g. HEAD~3

Prints one line per config: the PTX hash at REV, here, and of the tuned variant (comments stripped before hashing).
Exit status 1 when a default differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (compile call with the default knobs, the tuned knobs added to it)
CONFIGS = {
    "gemv_multi Qwen3 q/k/v dp4a": (
        "gemv_chunk.compile_gemv_multi.uncached((('Q4_K', 4096), ('Q4_K', 512), ('Q6_K_P', 512)), 2048, True, 132{})",
        "rows_per_warp=(1, 2, 2)"),
    "moe_down_chunk Q4_K dp4a": (
        "moe_ffn_chunk.compile_moe_down_chunk.uncached('Q4_K', 768, 2048, 8, False, True, 1{})",
        "x_loads_first=True"),
    "quant_gemm Q4_K K=2048 64x32": ("quant_gemm.compile_quant_gemm.uncached('Q4_K', 2048, 64, 32{})", "stages=2"),
    "gemv slice Q8_0 2816 dp4a": ("gemv.compile_gemv.uncached('Q8_0', 2816, q8=True{})", "warps_per_row=2"),
    "moe_down slice Q8_0 704 dp4a": ("moe_ffn.compile_moe_down.uncached('Q8_0', 704, 2816, q8=True{})",
                                     "warps_per_row=1"),
    "router_gemv 128/2048 prenorm q8": (
        "router_gemv.compile_router_gemv.uncached(128, 2048, 8, prenorm=True, prenorm_q8=True{})", "warps_per_row=4"),
    "moe_gate_up_chunk Q4_K dp4a q8 out": (
        "moe_ffn_chunk.compile_moe_gate_up_chunk.uncached('Q4_K', 2048, 768, False, True, 2, quantize_out=True{})",
        "x_loads_first=True"),
    "moe_down_chunk Q4_K dp4a + Qwen tail": (
        "moe_ffn_chunk.compile_moe_down_chunk.uncached('Q4_K', 768, 2048, 8, False, True, 1, "
        "tail=norm_chain.FfnTail(2048, next_q8=True, post_norm=False){})", "x_loads_first=True"),
    "moe_down slice Q8_0 + Gemma 4 tail": (
        "moe_ffn.compile_moe_down.uncached('Q8_0', 704, 2816, q8=True, "
        "tail=norm_chain.FfnTail(2816, has_experts=True, next_q8=True){})", "warps_per_row=1"),
    "attention 32/4/128 32 splits": (
        "attention_decode.compile_attention_decode.uncached(32, 4, 128, 64, 32, False, fused_combine=True{})",
        "heads_per_cta=4, keys_per_iter=2"),
}

CHILD = """
import hashlib, importlib, re, sys
from sparkinfer_cute.kernels.compile import extra_options


class Modules(dict):  # a config names its kernel module; only that one is imported (a revision may lack the others)
    def __missing__(self, name):
        return importlib.import_module('sparkinfer_cute.kernels.' + name)


with extra_options('--keep-ptx'):
    c = eval(sys.argv[1], {}, Modules())
print(hashlib.sha256(re.sub(r'//.*\\n', '\\n', c.artifacts.PTX).encode()).hexdigest()[:16])
"""


def ptx_hash(tree: Path, call: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree), SPARKINFER_DISK_CACHE="0")
    r = subprocess.run([sys.executable, "-c", CHILD, call], capture_output=True, text=True, env=env, cwd=tree,
                       check=False)
    if r.returncode:
        return "error: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return r.stdout.strip()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rev = sys.argv[1]
    changed = 0
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        archive = subprocess.run(["git", "archive", rev, "sparkinfer_cute"], cwd=ROOT, capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        for name, (call, knobs) in CONFIGS.items():
            before, after = ptx_hash(old, call.format("")), ptx_hash(ROOT, call.format(""))
            tuned = ptx_hash(ROOT, call.format(", " + knobs))
            same = before == after and not before.startswith("error")
            changed += not same
            print(f"{name}: default {before} at {rev}, {after} here ({'same' if same else 'DIFFERENT'}); "
                  f"tuned ({knobs}) {tuned}")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
