"""`python -m sparkinfer_cute.run [MODEL.gguf] [-p PROMPT] [-n N] [--temp T --top-k K --top-p P --seed S] [--chat]`

Streams the generated text, then prints load time and prompt/decode speeds. With no model it runs the packaged
Gemma 3 270M (the `demo` extra), offline. Uses the GPU backend when a supported CUDA GPU is present, else the numpy
CPU reference backend (and says so).
"""

from __future__ import annotations

import argparse
import sys

from .engine import CPU_NUMERICS, DEFAULT_CPU_NUMERICS
from .errors import SparkinferError
from .sampling import SamplerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparkinfer_cute.run", description=__doc__.split("\n\n")[1])
    p.add_argument("model", nargs="?", help="GGUF file (default: the packaged Gemma 3 270M Q4_K_M)")
    p.add_argument("-p", "--prompt", default="The capital of France is")
    p.add_argument("-n", "--n-predict", type=int, default=32, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--backend", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--cpu-numerics", choices=CPU_NUMERICS, default=DEFAULT_CPU_NUMERICS,
                   help="CPU backend: llama.cpp's CPU numerics bit for bit (default; same text as llama.cpp) or exact "
                        "float32 math (the reference the GPU path is gated against; ~5x faster on the CPU)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: model's, capped)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .engine import Engine, default_model_path

    path = args.model or default_model_path()
    try:
        eng = Engine(path, backend_name=args.backend, max_context=args.ctx_size, progress=not args.no_progress,
                     cpu_numerics=args.cpu_numerics)
        print(f"[sparkinfer_cute] {eng.cfg.arch} from {path}; backend: {eng.backend.name} ({eng.backend_note})",
              file=sys.stderr)
        def write(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()

        eng.complete(args.prompt, args.n_predict, SamplerConfig(args.temp, args.top_k, args.top_p, args.seed),
                     chat=args.chat, on_text=write, on_start=lambda: write(args.prompt))
    except SparkinferError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    st = eng.stats
    print(file=sys.stdout)
    print(f"[sparkinfer_cute] load {st.load_s:.2f} s | prompt {st.prompt_tokens} tok, {st.prefill_tps:.1f} tok/s | "
          f"decode {st.gen_tokens} tok, {st.decode_tps:.1f} tok/s | backend {st.backend}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
