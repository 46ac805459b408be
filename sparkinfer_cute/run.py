"""`python -m sparkinfer_cute.run [MODEL.gguf] [-p PROMPT] [-n N] [--temp T --top-k K --top-p P --seed S] [--chat]`
(installed as the `sparkinfer-run` command too)

Streams the generated text, then prints load time and prompt/decode speeds. With no model it runs the packaged
Gemma 3 270M (the `demo` extra), offline. Uses the GPU backend when a supported CUDA GPU is present, else the numpy
CPU reference backend (and says so).

Exit status: 0 done; 2 could not run as asked (a bad argument, an unusable file, a prompt that does not fit the
context, --backend gpu without a GPU), with a one-line `error: ...` on stderr and nothing computed.
"""

from __future__ import annotations

import argparse
import math
import sys

from .cli_args import ArgumentParser, existing_file, fail, float_in, int_at_least, nonempty_text, require_gpu

# kept in step with engine.CPU_NUMERICS / DEFAULT_CPU_NUMERICS (tests/cli/test_cli_args.py checks), so that --help
# and a bad argument answer without importing numpy and the engine
CPU_NUMERICS = ("exact", "llama")
DEFAULT_CPU_NUMERICS = "exact"
DEFAULT_PROMPT = "The capital of France is"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sparkinfer_cute.run", description=__doc__.split("\n\n")[1],
                       epilog=__doc__.split("\n\n")[2])
    p.add_argument("model", nargs="?", type=existing_file, default=None,
                   help="GGUF file (default: the packaged Gemma 3 270M Q4_K_M)")
    p.add_argument("-p", "--prompt", type=nonempty_text, default=DEFAULT_PROMPT, help="the text to continue")
    p.add_argument("-n", "--n-predict", type=int_at_least(0), default=32,
                   help="tokens to generate (0: only process the prompt); stops early at end of generation")
    p.add_argument("--temp", type=float_in(0.0), default=0.0,
                   help="sampling temperature, >= 0; 0 = greedy (always the most likely token)")
    p.add_argument("--top-k", type=int_at_least(0), default=40,
                   help="sample only among the K most likely tokens (0 = no limit; used when --temp > 0)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=0.95,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P, in (0, 1] "
                        "(1 = off; used when --temp > 0)")
    p.add_argument("--seed", type=int_at_least(0), default=None,
                   help="random seed for sampling, >= 0 (default: a fresh one each run)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (from the GGUF; Gemma 3, Gemma 4, Qwen3, "
                        "Qwen3.5) and print the reply apart from the prompt")
    p.add_argument("--backend", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU when a supported one is present, else the CPU reference backend")
    p.add_argument("--cpu-numerics", choices=CPU_NUMERICS, default=DEFAULT_CPU_NUMERICS,
                   help="CPU backend numerics: 'exact' float32 math (the reference the GPU path is gated against; "
                        "weights dequantized once at load) or 'llama', llama.cpp's CPU numerics op by op "
                        "(a testing instrument, ~20x slower on a prompt: same text as the x86 AVX512 llama.cpp "
                        "build it was validated against; other builds can flip near-ties)")
    p.add_argument("-t", "--threads", type=int_at_least(1), default=None,
                   help="CPU backend: BLAS threads (default: all cores but one, at least 1; OPENBLAS_NUM_THREADS "
                        "is respected)")
    p.add_argument("-c", "--ctx-size", type=int_at_least(1), default=None,
                   help="context length in tokens, prompt + generated (default: the model's, capped)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (weight upload, long prompts on the CPU)")
    return p


def _fmt_tps(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.1f} tok/s"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backend == "gpu":
        require_gpu(parser.prog, "--backend gpu")
    from .engine import Engine, default_model_path
    from .errors import SparkinferError
    from .sampling import SamplerConfig

    try:
        path = args.model or default_model_path()
        eng = Engine(path, backend_name=args.backend, max_context=args.ctx_size, progress=not args.no_progress,
                     cpu_numerics=args.cpu_numerics, cpu_threads=args.threads)

        def write(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()

        def start() -> None:  # once the request is accepted: a refused one prints only its error line
            print(f"[sparkinfer_cute] {eng.cfg.arch} from {path}; backend: {eng.backend.name} ({eng.backend_note})",
                  file=sys.stderr)
            warn = eng.chat_warning() if args.chat else None
            if warn:
                print(f"warning: {warn}", file=sys.stderr)
            # plain: the reply continues the prompt on the same line, as llama.cpp prints it; chat: the prompt is
            # the user's turn, so it stands on its own line and the reply starts below it
            write(f"> {args.prompt}\n\n" if args.chat else args.prompt)

        eng.complete(args.prompt, args.n_predict, SamplerConfig(args.temp, args.top_k, args.top_p, args.seed),
                     chat=args.chat, on_text=write, on_start=start)
    except SparkinferError as e:  # a bad file, a prompt too long, no GPU for --backend gpu: one line, no traceback
        fail(e)
    st = eng.stats
    print(file=sys.stdout)
    decode = f"decode {st.gen_tokens} tok, {_fmt_tps(st.decode_tps)}" if st.gen_tokens else "decode 0 tok"
    print(f"[sparkinfer_cute] load {st.load_s:.2f} s | prompt {st.prompt_tokens} tok, {_fmt_tps(st.prefill_tps)} | "
          f"{decode} | backend {st.backend} (speeds exclude warm-up, which load time includes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
