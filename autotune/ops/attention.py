"""Tunable op ``attention_decode``: split-KV flash-decoding over the paged fp16 KV cache with the fused LSE combine
(``kernels/attention_decode.py``, the variant the models run), per context bucket.

Shape: ``n_head``, ``n_kv_head``, ``head_dim``, ``qk_rot``, ``ctx``. ``qk_rot``: the rotary dims of the Q/K
prologue the kernel runs inside (per-head Q/K RMSNorm + RoPE + this token's K/V append: ``fused_qk_attention``,
what the models run by default: :func:`prologue_rot`), 0 for attention alone (with the pass off). ``ctx`` = live
keys the query attends to (the context length, or the sliding window when that is shorter), bucketed up to a power
of two (>= 64). The page size is the models' (64). Optional shape fields (left out of a cache key when false):
``v_norm`` (the prologue RMS-normalizes V without a weight: Gemma 4) and ``qk_freq_factors`` (its RoPE divides
theta by a per-pair vector: Gemma 4's rope_freqs on global layers, Gemma 3 4B+'s linear scaling), so the timed
kernel is the one the layer runs; both need the prologue (``qk_rot`` > 0).

Configs (the tuning arguments of ``compile_attention_decode``): ``num_splits`` (key-range chunks per kv head: CTAs
that share one query), ``heads_per_cta`` (q heads of a GQA group per CTA: a divisor of the group) and
``keys_per_iter`` (keys whose loads a token group issues before any math). Validity: the kernel's own constructor
(shared memory of the token-group merge within the family budget, heads_per_cta dividing the group).

Default: ``num_splits`` as ``models/ops.py attention_splits`` picks it with the context = the bucket (the
compile-gated ``MODEL_CONFIGS`` entry when the model matches one, else ``default_num_splits``), and the kernel's
automatic ``heads_per_cta`` / ``keys_per_iter``. Reference: ``attention_decode_ref`` (float64) on the same fp16 K/V
(with ``qk_rot``: after ``qk_norm_rope_kv_ref`` of the raw q and the new K/V row, with the V norm and the theta
divisors (drawn in 1..4) the shape names, that row in the cache),
``max|out - ref| / max|ref| <= 1e-3`` (the kernel's documented test tolerance).

Applied by the engine (``models/ops.py attention_config``): the decode graph is captured once for every position up
to the decoder's max context, so each layer type takes the config of the bucket of its most live keys (the max
context, or the window of a sliding-window layer) for all positions; ``attention_decode(num_splits=...,
heads_per_cta=..., keys_per_iter=...)``, the split workspace sized for it. Tune with ``--ctx`` at the context the
engine runs (the default ``--ctx`` buckets 512 / 4096 / 32768 cover a max context of 257..512, 2049..4096, ...).
The batched prefill's attention (one split per query row) is not tuned.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ..measure import KernelRunner, copies_for_cold_l2, nonfinite, ptr
from ..registry import TunableOp, int_in, pow2_bucket, register, unknown_keys_reason

PAGE_SIZE = 64  # models/ops.py PAGE_SIZE: the page size every model's KV cache uses
SPLITS = tuple(2**i for i in range(9))  # 1 .. 256
KEYS_PER_ITER = (1, 2, 4)
MIN_KEYS_PER_SPLIT = 16  # searched splits keep at least this many keys each (fewer: CTAs with no work)
MIN_CTX_BUCKET = 64
REL_TOL = 1e-3
ROPE_BASE = 1e4  # the prologue's RoPE base in the timed problem (any base costs the same)
EPS = 1e-6


@functools.cache
def _bind() -> SimpleNamespace:
    """Every kernel-package name this adapter uses (the one place to fix after kernels/ moves)."""
    from sparkinfer_cute.kernels import attention_decode as a
    from sparkinfer_cute.reference.kernel_refs import attention_decode_ref, qk_norm_rope_kv_ref, rel_err, theta_scale_f32

    return SimpleNamespace(
        AttentionDecodeSplitKV=a.AttentionDecodeSplitKV, compile_attention_decode=a.compile_attention_decode,
        fused_counter_count=a.fused_counter_count, default_num_splits=a.default_num_splits,
        MODEL_CONFIGS=a.MODEL_CONFIGS, SUPPORTED_HEAD_DIMS=a.SUPPORTED_HEAD_DIMS,
        prologue_supported=a.prologue_supported, attention_decode_ref=attention_decode_ref,
        qk_norm_rope_kv_ref=qk_norm_rope_kv_ref, theta_scale_f32=theta_scale_f32, rel_err=rel_err)


def prologue_rot(n_head: int, n_kv_head: int, head_dim: int, n_rot: int) -> int:
    """The ``qk_rot`` shape field of a layer kind as the models run it by default: its rotary dims where the
    fused-combine kernel can hold the Q/K prologue (models/ops.py ``fused_qk_attention`` with the passes on), else 0."""
    b = _bind()
    if head_dim not in b.SUPPORTED_HEAD_DIMS or n_head % n_kv_head:
        return 0
    return n_rot if b.prologue_supported(n_head, n_kv_head, head_dim, 256) else 0


def ctx_bucket(ctx: int) -> int:
    """Live keys rounded up to a power of two (at least 64): the key the cache stores attention configs under."""
    return pow2_bucket(ctx, MIN_CTX_BUCKET)


def _bucket(shape):
    return dict(shape, ctx=ctx_bucket(shape["ctx"]))


def _group(shape) -> int:
    return shape["n_head"] // shape["n_kv_head"]


def _space(shape, ctx):
    G, n = _group(shape), shape["ctx"]
    splits = [s for s in SPLITS if s == 1 or n // s >= MIN_KEYS_PER_SPLIT]
    heads = [d for d in range(1, G + 1) if G % d == 0]
    return [dict(num_splits=s, heads_per_cta=h, keys_per_iter=u) for s in splits for h in heads
            for u in KEYS_PER_ITER]


def _default(shape, ctx):
    b = _bind()
    H, KV, D, n = shape["n_head"], shape["n_kv_head"], shape["head_dim"], shape["ctx"]
    # models/ops.py attention_splits with max_context = the bucket
    splits = None
    for c in b.MODEL_CONFIGS.values():
        if (c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"]) == (H, KV, D, PAGE_SIZE):
            splits = min(c["num_splits"], max(1, n // 64))
            break
    if splits is None:
        splits = b.default_num_splits(KV, n, ctx.sm_count)
    return dict(num_splits=splits, heads_per_cta=0, keys_per_iter=0)


OPTIONAL = (("v_norm", False), ("qk_freq_factors", False))


def _prologue_flags(shape) -> dict:
    """The prologue's compile flags beyond ``qk_rot`` (the optional shape fields; absent = False)."""
    return dict(qk_freq_factors=bool(shape.get("qk_freq_factors", False)), v_norm=bool(shape.get("v_norm", False)))


def _kernel(config, shape):
    """The kernel object (its constructor is the validity check: ValueError with the reason)."""
    return _bind().AttentionDecodeSplitKV(
        shape["n_head"], shape["n_kv_head"], shape["head_dim"], PAGE_SIZE, config["num_splits"], False,
        keys_per_iter=config["keys_per_iter"], heads_per_cta=config["heads_per_cta"], fused_combine=True,
        qk_rot=shape["qk_rot"], **_prologue_flags(shape))


def _canonical(config, shape, ctx):
    """0 ("automatic") heads_per_cta / keys_per_iter -> what the kernel picks."""
    if config.get("heads_per_cta") == 0 or config.get("keys_per_iter") == 0:
        try:
            k = _kernel(config, shape)
        except (ValueError, KeyError, TypeError):
            return config  # invalid either way: why_invalid says why
        config = dict(config, heads_per_cta=k.heads_per_cta, keys_per_iter=k.keys_per_iter)
    return config


def _why_invalid(config, shape, ctx):
    b = _bind()
    if shape["n_head"] % shape["n_kv_head"]:
        return f"n_head {shape['n_head']} is not a multiple of n_kv_head {shape['n_kv_head']}"
    if shape["head_dim"] not in b.SUPPORTED_HEAD_DIMS:
        return f"head_dim {shape['head_dim']} not supported (one of {b.SUPPORTED_HEAD_DIMS})"
    rot = shape["qk_rot"]
    if isinstance(rot, bool) or not isinstance(rot, int) or rot < 0 or rot % 2 or rot > shape["head_dim"]:
        return f"qk_rot={rot!r} is not an even rotary width in 0..head_dim"
    for k, _ in OPTIONAL:
        v = shape.get(k, False)
        if not isinstance(v, bool):
            return f"{k}={v!r} is not a bool"
        if v and not rot:
            return f"{k} needs the Q/K prologue (qk_rot > 0)"
    why = (unknown_keys_reason(config, {"num_splits", "heads_per_cta", "keys_per_iter"})
           or int_in(config, "num_splits", SPLITS) or int_in(config, "keys_per_iter", KEYS_PER_ITER))
    if why:
        return why
    hpc = config.get("heads_per_cta")
    if isinstance(hpc, bool) or not isinstance(hpc, int) or hpc < 1:
        return f"heads_per_cta={hpc!r} is not a positive int"
    try:
        _kernel(config, shape)
    except ValueError as e:  # smem over the family budget, heads_per_cta not dividing the group
        return str(e)
    return None


def _compile(config, shape):
    return _bind().compile_attention_decode(
        n_head=shape["n_head"], n_kv_head=shape["n_kv_head"], head_dim=shape["head_dim"], page_size=PAGE_SIZE,
        num_splits=config["num_splits"], softcap=False, heads_per_cta=config["heads_per_cta"],
        keys_per_iter=config["keys_per_iter"], fused_combine=True, qk_rot=shape["qk_rot"], **_prologue_flags(shape))


class AttentionProblem:
    """Host side: one query token at position ctx-1 over ctx random fp16 keys per input set; each set is its own
    range of pool pages (a page table per set, pages permuted), so rotating sets reads other K/V rows. With
    ``qk_rot``, ``q`` is the raw projection and the kernel's prologue norms and rotates it and writes this token's
    K/V row (``k_new``, ``v_new``) at ctx-1 of the set it reads (every launch writes the same bits). The float64
    reference covers set 0."""

    def __init__(self, shape, n_sets: int, rng):
        H, KV, D, n = shape["n_head"], shape["n_kv_head"], shape["head_dim"], shape["ctx"]
        self.pages = -(-n // PAGE_SIZE)
        total = self.pages * n_sets
        self.k_pool = rng.standard_normal((total, PAGE_SIZE, KV, D), dtype=np.float32).astype(np.float16)
        self.v_pool = rng.standard_normal((total, PAGE_SIZE, KV, D), dtype=np.float32).astype(np.float16)
        self.tables = [(s * self.pages + rng.permutation(self.pages)).astype(np.int32).reshape(1, self.pages)
                       for s in range(n_sets)]
        self.q = rng.standard_normal((1, H, D), dtype=np.float32)
        self.scale = 1.0 / math.sqrt(D)
        t = np.arange(n)  # token t of set 0 lives in page tables[0][t // P] at slot t % P
        page, slot = self.tables[0][0, t // PAGE_SIZE], t % PAGE_SIZE
        k_dense, v_dense, q = self.k_pool[page, slot], self.v_pool[page, slot], self.q[0]
        self.rot = shape["qk_rot"]
        if self.rot:
            b = _bind()
            self.k_new = rng.standard_normal((1, KV, D), dtype=np.float32)
            self.v_new = rng.standard_normal((1, KV, D), dtype=np.float32)
            self.q_norm = rng.uniform(0.5, 1.5, D).astype(np.float32)
            self.k_norm = rng.uniform(0.5, 1.5, D).astype(np.float32)
            self.theta_scale = float(b.theta_scale_f32(ROPE_BASE, self.rot))
            flags = _prologue_flags(shape)
            self.v_norm = flags["v_norm"]
            self.freq_factors = (rng.uniform(1.0, 4.0, self.rot // 2).astype(np.float32)
                                 if flags["qk_freq_factors"] else None)
            q, kc, vc = b.qk_norm_rope_kv_ref(self.q, self.k_new, self.v_new, self.q_norm, self.k_norm, [n - 1],
                                              n_rot=self.rot, base=ROPE_BASE, eps=EPS,
                                              freq_factors=self.freq_factors, v_norm=self.v_norm)
            q = q[0]
            k_dense, v_dense = k_dense.copy(), v_dense.copy()
            k_dense[n - 1], v_dense[n - 1] = kc[0].astype(np.float16), vc[0].astype(np.float16)
        self.ref = _bind().attention_decode_ref(q, k_dense, v_dense, n - 1, self.scale)

    def check(self, out) -> str | None:
        why = nonfinite(out, "out")
        if why:
            return why
        err = _bind().rel_err(out[0], self.ref)
        return f"max|out - ref| / max|ref| = {err:.3g} > {REL_TOL}" if err > REL_TOL else None


class AttentionRunner(KernelRunner):
    def __init__(self, shape, ctx):
        super().__init__(shape, ctx)
        from sparkinfer_cute.runtime import DeviceArray

        H, KV, D, n = shape["n_head"], shape["n_kv_head"], shape["head_dim"], shape["ctx"]
        self.n_sets = copies_for_cold_l2(2 * -(-n // PAGE_SIZE) * PAGE_SIZE * KV * D * 2, ctx.l2_bytes)
        self.problem = p = AttentionProblem(shape, self.n_sets, self.rng)
        self.k, self.v = DeviceArray.from_numpy(p.k_pool, self.stream), DeviceArray.from_numpy(p.v_pool, self.stream)
        self.tables = [DeviceArray.from_numpy(t, self.stream) for t in p.tables]
        self.pos = DeviceArray.from_numpy(np.array([n - 1], np.int32), self.stream)
        self.q = DeviceArray.from_numpy(p.q, self.stream)
        self.out = DeviceArray.empty((1, H, D), np.float32)
        self.outputs = [self.out]
        self.counters = DeviceArray.zeros((H,), np.int32, stream=self.stream)  # >= fused_counter_count: n_head
        # the Q/K prologue's inputs (with qk_rot; else never read: any valid pointer) and its theta divisors (with
        # qk_freq_factors; else never read)
        self.prologue = ([DeviceArray.from_numpy(a, self.stream) for a in (p.k_new, p.v_new, p.q_norm, p.k_norm)]
                         if p.rot else [self.counters] * 4)
        self.freq_factors = (DeviceArray.from_numpy(p.freq_factors, self.stream)
                             if p.rot and p.freq_factors is not None else self.counters)
        self.work: dict[int, tuple] = {}

    def _workspace(self, S: int):
        from sparkinfer_cute.runtime import DeviceArray

        if S not in self.work:
            H, D = self.shape["n_head"], self.shape["head_dim"]
            self.work[S] = (DeviceArray.empty((1, H, S, D), np.float32), DeviceArray.empty((1, H, S), np.float32))
        return self.work[S]

    def before_launch(self, config):
        # the fused combine leaves its arrival counters at zero; re-zero them in case a broken config did not
        self.counters.fill_bytes(0, self.stream)

    def launcher(self, config, i):
        from cutlass import Float16, Float32, Int8, Int32

        fn, p = _compile(config, self.shape), self.problem
        o_part, lse_part = self._workspace(config["num_splits"])
        args = (ptr(Float32, self.q.ptr), ptr(Float16, self.k.ptr), ptr(Float16, self.v.ptr),
                ptr(Int32, self.tables[i].ptr, 4), ptr(Int32, self.pos.ptr, 4), ptr(Float32, o_part.ptr),
                ptr(Float32, lse_part.ptr, 4), ptr(Float32, self.out.ptr, 4), ptr(Int32, self.counters.ptr, 4),
                # the q8_1 output (quantize_out) is not tuned here: never written, any valid pointers do
                ptr(Int8, self.counters.ptr, 4), ptr(Float32, self.counters.ptr, 4), ptr(Float32, self.counters.ptr, 4),
                # the Q/K prologue's k_new, v_new, q_norm, k_norm, freq_factors
                *(ptr(Float32, a.ptr, 4) for a in self.prologue), ptr(Float32, self.freq_factors.ptr, 4),
                Int32(1), Int32(p.pages * self.n_sets), Int32(p.pages), Float32(p.scale), Int32(0), Float32(1.0),
                Float32(p.theta_scale if p.rot else 1.0), Float32(EPS), Float32(1.0), self.stream.cu)
        return lambda: fn(*args)

    def check(self, config, out):
        return self.problem.check(out)


ATTENTION_DECODE = register(TunableOp(
    name="attention_decode",
    summary="split-KV decode attention with the fused combine: splits, heads per CTA, keys in flight",
    shape_keys=("n_head", "n_kv_head", "head_dim", "qk_rot", "ctx"),
    space=_space,
    default=_default,
    why_invalid=_why_invalid,
    compile=_compile,
    build=AttentionRunner,
    bucket=_bucket,
    canonical=_canonical,
    compile_shape_keys=("n_head", "n_kv_head", "head_dim", "qk_rot"),  # the context is read from device memory
    optional_shape_keys=OPTIONAL,
), __name__)
