"""Every matrix op of every GPU forward gets an input as wide as its weight's rows, on the decode step and on a
prefill chunk, for every architecture (models/dry_run.py ``WIDTH_CHECKS``, no GPU). Gemma 4 is the case that needs
it: its sliding layers' O projection takes 16 x 256 inputs, its global layers' 16 x 512, from buffers sized for the
widest layer; a forward that passed the whole buffer failed at graph capture (decode) or read past the weight
(prefill: the grouped GEMM walks the weight at the input's row size)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.gguf.synth import write_synthetic
from sparkinfer_cute.models.dry_run import PATHS, DryArray, WidthMismatch, check_widths, record
from sparkinfer_cute.runtime.weights import QWeight


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("widths")
    files = {}
    for arch in ("qwen3moe", "gemma3", "gemma4"):
        files[arch] = str(d / f"{arch}.gguf")
        write_synthetic(files[arch], arch=arch, preset="tiny", seed=5)
    return files


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_every_matrix_op_gets_its_weights_width(tiny_files, arch, path):
    m, calls = record(tiny_files[arch], path=path)  # raises WidthMismatch on the first mismatched call
    checked = [c for c in calls if c.op in ("gemv", "gemm", "gemv_qkv", "gemv_qk")]
    assert checked, "no matrix op was recorded"
    if arch == "gemma4":
        widths = {a.n_head * a.head_dim for a in m.attn_layers}
        assert len(widths) == 2, "the preset must mix head sizes for this test to mean anything"
        o_in = {c.args[1].shape[-1] for c in calls if c.op in ("gemv", "gemm")
                and c.args[0].name.endswith("attn_output.weight")}
        assert o_in == widths


def test_the_check_refuses_a_wider_input():
    w = QWeight("blk.0.attn_output.weight", "Q4_K", (256, 64), DryArray((64 * 144,), np.uint8), 144)
    check_widths("gemv", (w, DryArray((256,), np.float32), None), {})
    check_widths("gemm", (w, DryArray((4, 256), "q8_1"), None, 4), {})
    with pytest.raises(WidthMismatch, match="input width 512"):
        check_widths("gemv", (w, DryArray((512,), np.float32), None), {})
    with pytest.raises(WidthMismatch, match="xq width 512"):
        check_widths("gemv", (w, DryArray((256,), np.float32), None), {"xq": DryArray((1, 512), "q8_1")})
    with pytest.raises(WidthMismatch):
        check_widths("gemm", (w, DryArray((4, 512), "q8_1"), None, 4), {})
    with pytest.raises(WidthMismatch):  # a narrowed copy of the wrong width
        check_widths("gemm", (w, DryArray((4, 512), "q8_1").narrow(128), None, 4), {})
