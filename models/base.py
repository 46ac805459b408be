"""What every GPU forward shares: weight upload, activation buffers, the KV cache, and CUDA-graph decode.

A model subclass implements ``enqueue_step(stream, n_layers=None)``: every kernel of one decode step (embedding of
the token id held in ``self.tok`` at the position held in ``self.pos``, all layers, final norm, LM head, argmax into
``self.tok``) on ``stream``, reading the token id and position **from device memory**. The step is captured once into
a CUDA graph and replayed per token; between replays the host writes at most the next prompt token and the position
(4 bytes each) and reads back the sampled id (4 bytes). Routing (expert ids and weights) never leaves the device.

Seams for what comes next:
- attention geometry is per layer (``self.attn_layers``, from the config's ``*_for(layer)`` views): KV cache sizing,
  split counts and the split workspace follow it, so layer types with other head sizes / KV heads / windows fit.
- prompt prefill goes through :meth:`GPUDecoder.prefill_chunk` (T tokens in, logits of the last one left in
  ``self.logits``). The default replays the decode graph once per token; a batched prefill overrides it (and may
  set ``PREFILL_CHUNK`` to the most tokens its buffers take per call).

Tuned launch configs: ``tuned`` (the engine's ``autotune.load_tuned(device)``; None: every kernel takes today's
heuristic) is made current (``ops.tuned_configs``) around buffer allocation (the attention split counts size the
split workspace) and around every enqueue, so each call site of ``models/ops.py`` looks up its op and shape there.
Graphs capture the configs in force at capture time: the decode graph one per call site (attention: the bucket of
the max context), each prefill graph those of its chunk length.
"""

from __future__ import annotations

import os
import time

import numpy as np

from sparkinfer_cute.errors import ContextOverflowError, GGUFError
from sparkinfer_cute.kernels.arch import kernel_family
from sparkinfer_cute.models import ops
from sparkinfer_cute.lru import LRUCache
from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Stream, get_device
from sparkinfer_cute.runtime.weights import QWeight, WeightStore

DEFAULT_MAX_CONTEXT = 4096


class GPUDecoder:
    name = "gpu"
    # Whether the forward passes linear RoPE scaling to its RoPE kernels (:meth:`linear_rope_factors`); a file that
    # has it is refused by a forward that does not (Gemma 4: its global layers' rope_freqs already take that input).
    LINEAR_ROPE_SCALING = False

    def __init__(self, g, cfg, *, max_context: int | None = None, progress: bool = True, tuned=None):
        self.g, self.cfg = g, cfg
        self.tuned = tuned
        scaled = self.rope_scaled_layers()
        if scaled and not self.LINEAR_ROPE_SCALING:  # refuse rather than compute another model
            raise GGUFError(g.path, f"linear RoPE scaling (factor {1 / cfg.rope_freq_scale_for(scaled[0]):g} on "
                                    f"{len(scaled)} layers) has no GPU forward for {cfg.arch} yet; use --backend cpu")
        self.device = get_device()
        self.max_context = int(min(max_context or DEFAULT_MAX_CONTEXT, cfg.context_length))
        if self.max_context <= 0:
            raise ContextOverflowError("max_context must be positive")
        self.stream = Stream()
        self.attn_layers = ops.attention_geometry(cfg)
        self.kv_bytes = self.kv_cache_bytes()
        t0 = time.perf_counter()
        self.w = WeightStore(g, self.weight_names(), extra_bytes=self.kv_bytes, progress=progress,
                             stream=self.stream, repack_q6k=self.repack_names())
        self.stream.synchronize()
        self.upload_s = time.perf_counter() - t0
        self.tok = DeviceArray.zeros((1,), np.int32, self.stream)
        self.pos_buf = DeviceArray.zeros((1,), np.int32, self.stream)
        self.logits = DeviceArray.empty((cfg.vocab_size,), np.float32)
        with self.tuning():
            self.alloc_buffers()
        self.alloc_kv_cache()
        self.pos = 0
        self._graph: CudaGraph | None = None
        self._host_i32 = np.zeros(1, np.int32)
        self.kernels_per_token = 0
        self.name = f"gpu ({self.device.name}, kernel family {self._family()})"

    # ------------------------------------------------------------------ per model
    LAYER_TENSORS: tuple[str, ...] = ()  # blk.N.<name> tensors the forward reads, in forward order

    def weight_names(self) -> list[str]:
        c = self.cfg
        names = ["token_embd.weight", "output_norm.weight"] + ([] if c.tied_output else ["output.weight"])
        for l in range(c.n_layer):
            names += [f"blk.{l}.{t}" for t in self.LAYER_TENSORS]
        return names

    def kv_cache_bytes(self) -> int:
        return ops.PagedKV.bytes_needed(self.attn_layers, self.max_context)

    def alloc_kv_cache(self) -> None:
        self.kv = ops.PagedKV(self.attn_layers, self.max_context)

    def repack_names(self) -> set[str]:
        """Q6_K tensors to upload padded (Q6_K_P) for aligned 32-bit loads: every GEMV/MoE weight, never the
        embedding table (the gather reads GGUF blocks). SPARKINFER_REPACK_Q6K=0 keeps the GGUF bytes."""
        if os.environ.get("SPARKINFER_REPACK_Q6K", "1") in ("0", "no", "false"):
            return set()
        return {n for n in self.weight_names() if n != "token_embd.weight"}

    def alloc_buffers(self) -> None:
        """Allocate the model's activation buffers (once: the graph is captured over them). Subclasses call
        :meth:`alloc_block_buffers` for the ones every transformer block has, then add their own."""
        raise NotImplementedError

    def fuse_rows(self, names: list[str], fused_name: str) -> QWeight | None:
        """One device buffer with the rows of the weights ``names`` one after the other (same type and n_in: the
        projections of one input), returned as one weight of all their rows; the parts become views into it (the
        prefill's GEMMs keep reading them by name), their own buffers are freed. One GEMV then computes all the
        projections where the chunk kernel's multi-matrix launch does not apply (:func:`ops.gemv_qkv`). None: the
        parts differ in type or n_in. The rows are copied on the device once, at start-up."""
        ws = [self.w[n] for n in names]
        if len({(w.qtype, w.n_in, w.row_bytes) for w in ws}) != 1:
            return None
        if any(sum(w.nbytes for w in ws[:i]) % 16 for i in range(1, len(ws))):
            return None  # a part would not start 16-byte aligned (the GEMM's and GEMV's wide loads)
        w0 = ws[0]
        buf = DeviceArray.empty((sum(w.nbytes for w in ws),), np.uint8)
        off = 0
        for n, w in zip(names, ws):
            part = buf.view(np.uint8, (w.nbytes,), offset_bytes=off)
            part.copy_from(w.data, self.stream)
            self.w[n] = QWeight(n, w.qtype, w.shape, part, w.row_bytes)
            off += w.nbytes
        self.stream.synchronize()  # the copies are done before the parts' own buffers are freed (dropped above)
        return QWeight(fused_name, w0.qtype, (w0.n_in, sum(w.n_out for w in ws)), buf, w0.row_bytes)

    def rope_scaled_layers(self) -> list[int]:
        """Layers with linear RoPE scaling (``rope.scaling.type`` linear: Gemma 3 4B and larger scale their global
        layers' RoPE by 1/8)."""
        return [l for l in range(self.cfg.n_layer) if self.cfg.rope_freq_scale_for(l) != 1.0]

    def linear_rope_factors(self) -> dict[int, QWeight]:
        """{layer: F32 divisor vector} for the layers with linear RoPE scaling: the RoPE kernels' ``freq_factors``
        input (theta / ff per pair) filled with the scaling factor, so theta / factor where llama.cpp computes
        ``freq_scale * theta`` with freq_scale = 1/factor (rope_cos_sin in sparkinfer_cute/reference/ops.py). For a
        power-of-two factor (Gemma 3: 8) the two are the same f32; for another, theta / F (rounded once) and
        theta * fl(1/F) can differ by one ulp of theta. One device vector per (factor, rotary width)."""
        out: dict[int, QWeight] = {}
        made: dict[tuple, QWeight] = {}
        for l in self.rope_scaled_layers():
            factor = 1.0 / float(self.cfg.rope_freq_scale_for(l))
            pairs = self.attn_layers[l].n_rot // 2
            key = (factor, pairs)
            if key not in made:
                data = DeviceArray.from_numpy(np.full(pairs, factor, np.float32).view(np.uint8), self.stream)
                made[key] = QWeight(f"rope_linear_scaling({factor:g})", "F32", (pairs,), data, 4 * pairs)
            out[l] = made[key]
        return out

    def packed_qkv(self, layer: int):
        """(q, k, v, qkv) views of this layer's projections, packed one after the other in ``self.qkv_buf`` (the
        layout of a :meth:`fuse_rows` GEMV's output): layers of another head size get their own packing of the one
        buffer. ``v`` is None on K = V layers (no V projection)."""
        a, c = self.attn_layers[layer], self.cfg
        nq, nkv = a.q_width, a.kv_width
        nv = nkv if getattr(c, "has_v", lambda l: True)(layer) else 0
        f32 = np.float32
        q = self.qkv_buf.view(f32, (nq,), offset_bytes=0)
        k = self.qkv_buf.view(f32, (nkv,), offset_bytes=4 * nq)
        v = self.qkv_buf.view(f32, (nv,), offset_bytes=4 * (nq + nkv)) if nv else None
        return q, k, v, self.qkv_buf.view(f32, (nq + nkv + nv,), offset_bytes=0)

    def attention_output(self, layer: int, attnq=None):
        """This layer's attention output: a view of ``self.attn`` of its own width (n_head * head_dim), and of
        ``attnq`` (its q8_1 copy for the int8 O projection) when given. The buffers are sized for the widest layer;
        a narrower layer's O projection takes exactly its width."""
        a = self.attn_layers[layer]
        n = a.q_width
        return self.attn.view(np.float32, (n,)), (None if attnq is None else attnq.narrow(n))

    def alloc_block_buffers(self) -> None:
        """The buffers every decoder block uses, sized for the largest attention layer: residual stream ``x``, normed
        block input ``h``, ``q``/``k``/``v``, attention output ``attn``, block output ``delta`` (added to ``x`` by the
        next norm), the split-KV workspace ``attn_ws``, the q8_1 copy ``hq_out`` of the final norm output and the
        arrival counter ``tail_counter`` of the kernels that run the norms after them (models/ops.py AfterFfn)."""
        E, f32 = self.cfg.n_embd, np.float32
        q_len = max(a.q_width for a in self.attn_layers)
        kv_len = max(a.kv_width for a in self.attn_layers)
        self.x = DeviceArray.zeros((E,), f32)
        self.h = DeviceArray.empty((E,), f32)
        # q, k, v packed in one buffer (sized for the widest layer): a fused-rows GEMV writes all three at once
        self.qkv_buf = DeviceArray.empty((q_len + 2 * kv_len,), f32)
        self.q = self.qkv_buf.view(f32, (q_len,), offset_bytes=0)
        self.k = self.qkv_buf.view(f32, (kv_len,), offset_bytes=4 * q_len)
        self.v = self.qkv_buf.view(f32, (kv_len,), offset_bytes=4 * (q_len + kv_len))
        self.attn = DeviceArray.empty((q_len,), f32)
        self.delta = DeviceArray.empty((E,), f32)
        self.attn_ws = ops.AttentionWorkspace(self.attn_layers, self.max_context)
        self.hq_out = ops.new_q8(E)
        self.tail_counter = DeviceArray.zeros((1,), np.int32)  # arrivals of a tail kernel's CTAs (ops.AfterFfn)

    def enqueue_step(self, stream, n_layers: int | None = None) -> None:
        """Enqueue one decode step on ``stream``. ``n_layers`` (eager debugging only): stop after that many layers,
        leaving the residual stream in ``self.x`` (+ ``self.delta``), without the final norm / LM head / argmax."""
        raise NotImplementedError

    #: int8 activations for the LM head under SPARKINFER_DP4A=auto (ops.prefer_dp4a): the model's choice
    LM_HEAD_DP4A_AUTO = True

    def lm_head_q8(self):
        """The q8_1 buffer the final norm should also fill when the LM head runs on int8 activations
        (:func:`ops.prefer_dp4a`), else None: pass it as the final norm's ``xq`` and to :meth:`enqueue_logits`.
        ``SPARKINFER_DISABLE=fused_head_q8``: None (the LM head quantizes with a launch of its own)."""
        if not ops.enabled("fused_head_q8"):
            return None
        return self.hq_out if ops.prefer_dp4a(self.out_w, auto=self.LM_HEAD_DP4A_AUTO) else None

    def enqueue_logits(self, stream, hq=None) -> None:
        """The LM head on the final-norm output ``self.h`` (int8 activations where :func:`ops.prefer_dp4a` says so:
        ``hq``, the q8_1 copy the final norm wrote (:meth:`lm_head_q8`), or quantized here), the final logit softcap
        where the model has one, and the greedy next id into ``self.tok``."""
        xq = self.hq_out if ops.prefer_dp4a(self.out_w, auto=self.LM_HEAD_DP4A_AUTO) else None
        if xq is not None and hq is None:
            ops.quantize(self.h, xq, stream=stream)
        ops.gemv(self.out_w, self.h, self.logits, stream=stream, xq=xq)
        cap = getattr(self.cfg, "final_logit_softcap", None)
        if cap:
            ops.softcap(self.logits, cap, stream=stream)
        ops.argmax(self.logits, self.tok, stream=stream)

    def enqueue_all_logits(self, stream, T: int, all_logits) -> None:
        """Every row's logits of a prefill chunk (the final norm of each row already in ``self._pf.h`` / ``hq``) into
        ``all_logits`` [T, vocab], softcapped where the model has one; the last row's greedy id into ``self.tok``."""
        pf = self._pf
        if ops.gemm_supports(self.out_w):
            ops.gemm(self.out_w, pf.hq, all_logits, T, stream=stream)
        else:
            ops.gemv_rows(self.out_w, pf.h, all_logits, T, stream=stream)
        cap = getattr(self.cfg, "final_logit_softcap", None)
        if cap:
            ops.softcap(ops.rows(all_logits, T), cap, stream=stream)
        ops.argmax(ops.row(all_logits, T - 1), self.tok, stream=stream)

    # ------------------------------------------------------------------ shared
    @staticmethod
    def _family() -> str:
        return kernel_family()

    def tuning(self):
        """Context in which the call sites of ``models/ops.py`` look up their launch configs in ``self.tuned``."""
        return ops.tuned_configs(getattr(self, "tuned", None))

    @property
    def resident_bytes(self) -> int:
        return self.w.resident_bytes + self.kv_bytes

    def _write_i32(self, buf: DeviceArray, value: int) -> None:
        self._host_i32[0] = value
        buf.copy_from_numpy(self._host_i32, self.stream)

    def _ensure_graph(self) -> None:
        if self._graph is not None:
            return
        # Warm-up outside capture: loads every kernel module (module loading is not allowed while capturing) and
        # counts launches. It decodes token 0 at the device position (0 before anything ran), writing KV there: so it
        # must run before the first prompt, which then overwrites that slot (prefill_chunk / prefill_all_logits
        # build the graph first; a batched prefill leaves the device position at 0, not at the prompt's end).
        ops.launch_counter.reset()
        with self.tuning():
            self.enqueue_step(self.stream)
            self.stream.synchronize()
            self.kernels_per_token = ops.launch_counter.count()
            with CudaGraph.capture(self.stream) as graph:
                self.enqueue_step(self.stream)
        self._graph = graph

    def warm_up(self) -> None:
        """Build the decode graph now (loads or compiles every kernel), so the first prompt is not charged for it."""
        self._ensure_graph()

    def reset(self) -> None:
        self.pos = 0

    def _step(self, tok: int | None) -> None:
        if self.pos >= self.max_context:
            raise ContextOverflowError(f"context of {self.max_context} tokens is full")
        self._ensure_graph()
        if tok is not None:
            self._write_i32(self.tok, tok)
        self._write_i32(self.pos_buf, self.pos)
        self._graph.replay(self.stream)
        self.pos += 1

    def step_eager(self, tok: int) -> None:
        """One step without the graph (debugging, and the graph-vs-eager test)."""
        self._write_i32(self.tok, tok)
        self._write_i32(self.pos_buf, self.pos)
        with self.tuning():
            self.enqueue_step(self.stream)
        self.pos += 1

    #: Most tokens one :meth:`prefill_chunk` call takes: the batched prefill's buffers are sized for it (llama.cpp's
    #: default ubatch).
    PREFILL_CHUNK: int | None = 512
    PREFILL_GRAPHS = 8  # captured chunk-length graphs kept (least recently used evicted: sparkinfer_cute/lru.py)

    def prefill(self, ids) -> np.ndarray:
        """Feed prompt tokens at positions ``pos ..``; returns the logits after the last one (f32 [vocab])."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if self.pos + len(ids) > self.max_context:
            raise ContextOverflowError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_context}")
        n = self.PREFILL_CHUNK or max(len(ids), 1)
        for i in range(0, len(ids), n):
            self.prefill_chunk(ids[i:i + n])
        return self.logits.to_numpy(self.stream)

    def batched_prefill(self) -> bool:
        """Prefill in batched chunks: the model has ``enqueue_prefill``, ``SPARKINFER_PREFILL`` is not ``loop``,
        ``SPARKINFER_DP4A`` is not ``none`` (exact f32 activations asked for: the grouped GEMM reads q8_1 activations
        only), and the grouped GEMM takes every weight the prefill multiplies (else the decode-graph loop: e.g. plain
        Q6_K with ``SPARKINFER_REPACK_Q6K=0``, or F16 weights, which only the decode GEMV reads)."""
        return (hasattr(self, "enqueue_prefill") and os.environ.get("SPARKINFER_PREFILL", "batched") != "loop"
                and ops.DP4A != "none" and not self.prefill_unsupported_weights())

    def prefill_unsupported_weights(self) -> list[str]:
        """Layer weights the batched prefill cannot take: a matrix the grouped GEMM does not read, or a router that is
        not F32 (the batched router reads F32 logits weights)."""
        return [n for n, w in self.w.items() if n.startswith("blk.") and len(w.shape) >= 2
                and not (w.qtype == "F32" if n.endswith("ffn_gate_inp.weight") else ops.gemm_supports(w))]

    def prefill_chunk(self, ids: np.ndarray) -> None:
        """Append T tokens at positions ``pos .. pos+T-1`` to the KV cache, leave the logits after the last one in
        ``self.logits`` (and the greedy next id in ``self.tok``) and advance ``pos`` by T. Batched (one grouped GEMM per
        weight over the T tokens, a CUDA graph per chunk length) where the model has ``enqueue_prefill``; else, and
        with ``SPARKINFER_PREFILL=loop`` (the reference path), one decode-graph replay per token."""
        if self.batched_prefill():
            self._ensure_graph()  # before the prompt's KV: its warm-up step writes the slot at device position 0
            self._prefill_batched(ids)
            return
        for t in ids:
            self._step(int(t))

    def _prefill_buffers(self):
        if getattr(self, "_pf", None) is None:
            self._pf = self.alloc_prefill(min(self.PREFILL_CHUNK or self.max_context, self.max_context))
            self._pf_graphs = LRUCache(self.PREFILL_GRAPHS)
        return self._pf

    def _prefill_batched(self, ids, all_logits=None) -> None:
        """One chunk of T tokens: write the ids and positions, then replay the chunk length's CUDA graph (captured on
        first use, after an eager run that loads the kernels). ``all_logits``: a [T, vocab] device buffer that
        receives every position's logits (eager, not captured: the accuracy harness)."""
        with self.tuning():
            self._run_prefill_chunk(ids, all_logits)

    def _run_prefill_chunk(self, ids, all_logits) -> None:
        self._write_chunk_inputs(ids)
        T = len(ids)
        if all_logits is not None:
            self.enqueue_prefill(self.stream, T, all_logits=all_logits)
        else:
            self._pf_graphs.get(T, lambda: self._capture_chunk(T)).replay(self.stream)
        self.pos += T

    def _capture_chunk(self, T: int) -> CudaGraph:
        """The CUDA graph of a T-token chunk, after an eager run that loads every kernel module (not allowed in a
        capture) and counts the launches."""
        ops.launch_counter.reset()
        self.enqueue_prefill(self.stream, T)
        self.stream.synchronize()
        self.kernels_per_prefill_chunk = ops.launch_counter.count()
        with CudaGraph.capture(self.stream) as graph:
            self.enqueue_prefill(self.stream, T)
        return graph

    def _write_chunk_inputs(self, ids):
        """The chunk's token ids (zero-padded) and positions ``pos ..`` into the prefill buffers; returns them."""
        pf = self._prefill_buffers()
        tok = np.zeros(pf.chunk, np.int32)
        tok[:len(ids)] = np.asarray(ids, np.int32)
        pf.tok.copy_from_numpy(tok, self.stream)
        pf.pos.copy_from_numpy(np.arange(self.pos, self.pos + pf.chunk, dtype=np.int32), self.stream)
        return pf

    def prefill_all_logits(self, ids) -> np.ndarray:
        """Teacher-forced logits of every position of ``ids`` (from the current position) through the batched
        prefill: [len(ids), vocab] (the accuracy harness)."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if self.pos + len(ids) > self.max_context:
            raise ContextOverflowError(f"{len(ids)} tokens do not fit the context of {self.max_context}")
        self._ensure_graph()  # as in prefill_chunk
        out = []
        n = self._prefill_buffers().chunk
        for i in range(0, len(ids), n):
            chunk = ids[i:i + n]
            buf = DeviceArray.empty((len(chunk), self.cfg.vocab_size), np.float32)
            self._prefill_batched(chunk, all_logits=buf)
            out.append(buf.to_numpy(self.stream))
        return np.concatenate(out)

    def prefill_hidden_after_layers(self, ids, n_layers: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The batched prefill's residual stream after ``n_layers`` layers for each of ``ids`` (one eager chunk from
        an empty cache), and the chunk's f32 / int32 buffers after the last layer run: ([len(ids), n_embd] float64,
        {name: flat numpy}: q, attn, o, delta, h, act, f, ids (the routed experts) and the model's own, e.g. Gemma 4's
        m / y2 / fn; row i of a layer of width n at [i * n, (i + 1) * n)). The per-layer bisection of a prefill
        accuracy gap (tools/prefill_bisect.py)."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        self.reset()
        T = len(ids)
        if T > self._prefill_buffers().chunk:
            raise ContextOverflowError(f"{T} tokens do not fit one prefill chunk of {self._pf.chunk}")
        self._ensure_graph()
        pf = self._write_chunk_inputs(ids)
        with self.tuning():
            self.enqueue_prefill(self.stream, T, n_layers=n_layers)
        bufs = {}
        for name, buf in vars(pf).items():
            if isinstance(buf, DeviceArray) and buf.dtype in (np.float32, np.int32) and buf.shape[:1] == (pf.chunk,):
                bufs[name] = buf.to_numpy(self.stream).reshape(-1)  # flat: a layer's rows pack at its own width
        x = bufs["x"].reshape(pf.chunk, -1)[:T].astype(np.float64)
        self.reset()
        return x, bufs

    def decode(self, tok: int) -> np.ndarray:
        self._step(int(tok))
        return self.logits.to_numpy(self.stream)

    def decode_greedy(self, tok: int | None) -> int:
        """Replays one step; the argmax kernel inside the graph leaves the next id in ``self.tok`` on the device.
        ``tok=None`` feeds the id already there (no host->device write at all)."""
        self._step(tok)
        return int(self.tok.to_numpy(self.stream)[0])

    def hidden_after_layers(self, tokens, n_layers: int) -> np.ndarray:
        """Residual stream after ``n_layers`` layers for each of ``tokens`` (eager launches, from an empty cache):
        [len(tokens), n_embd]. Checks a model too large for a full CPU reference against its first layers."""
        self.reset()
        out = []
        for t in tokens:
            self._write_i32(self.tok, int(t))
            self._write_i32(self.pos_buf, self.pos)
            with self.tuning():
                self.enqueue_step(self.stream, n_layers=n_layers)
            x = self.x.to_numpy(self.stream).astype(np.float64)
            if n_layers > 0:
                x += self.delta.to_numpy(self.stream)
            out.append(x)
            self.pos += 1
        self.reset()
        return np.stack(out)
