"""Compile cache for CuTe DSL kernels: in-process memo + on-disk exported objects.

``cute.compile`` never caches (it forces ``no_cache``), and the implicit ``@cute.jit`` call re-traces Python on every
call (~15 ms measured, cute-dsl.md §2.5 of the project spec), so every kernel in this package is compiled through
:func:`kernel_cache`:

    @kernel_cache
    def compile_rmsnorm(N: int, eps_is_runtime: bool = True):   # only hashable static config
        k = RMSNorm(N)
        return cute.compile(k, *fake_args, options=compile_options())

The key is (qualname, args, compile target, kernel family). Objects are exported with ``export_to_c`` and re-loaded
with ``cute.runtime.load_module`` (~1 ms instead of ~0.1-1 s of compile). The cache directory is fingerprinted by the
package sources, the cutlass-dsl and Python versions, so an edit or an upgrade never loads a stale object; writes go
to a temp file and ``os.replace`` (atomic), under an ``fcntl`` lock, so concurrent processes are safe. A file that
fails to load is quarantined and recompiled.

``SPARKINFER_CACHE_DIR`` sets the root (default ``~/.cache/sparkinfer_cute``); ``SPARKINFER_DISK_CACHE=0`` disables
the disk layer (the in-process memo stays).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from . import arch as _arch

_PKG_ROOT = Path(__file__).resolve().parent.parent
_lock = threading.Lock()  # cute.compile is not thread-safe (MLIR thread-local state)

# Compile statistics for the compile gate table: key -> dict(seconds, source, ...)
COMPILE_LOG: list[dict] = []


@functools.cache
def source_fingerprint() -> str:
    h = hashlib.sha256()
    for p in sorted(_PKG_ROOT.rglob("*.py")):
        h.update(str(p.relative_to(_PKG_ROOT)).encode())
        h.update(p.read_bytes())
    try:
        from importlib.metadata import version

        h.update(version("nvidia-cutlass-dsl").encode())
    except Exception:
        pass
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = Path(os.environ.get("SPARKINFER_CACHE_DIR", Path.home() / ".cache" / "sparkinfer_cute"))
    return root / "kernels" / source_fingerprint()


def disk_cache_enabled() -> bool:
    """On unless ``SPARKINFER_DISK_CACHE=0``, and only where a GPU driver is present: ``export_to_c`` links the
    host launcher against libcuda/libcudart symbols and fails without them (measured on the CPU CI box: "Symbols
    not found: _cuKernelGetAttribute, _cudaLaunchKernelEx, ..."), and a CPU-only process never launches anyway."""
    if os.environ.get("SPARKINFER_DISK_CACHE", "1") in ("0", "false", "no"):
        return False
    try:
        from ..runtime import device_available

        return device_available()
    except Exception:
        return False


_extra_options: list[str] = []


@contextmanager
def extra_options(*opts: str):
    """Append flags to every :func:`compile_options` inside the block (the compile gate uses
    ``extra_options("--keep-ptx", "--keep-cubin")`` to get ``compiled.artifacts.PTX`` / ``.CUBIN``)."""
    n = len(_extra_options)
    _extra_options.extend(opts)
    try:
        yield
    finally:
        del _extra_options[n:]


_dump_dir: str | None = None


def _private_dump_dir() -> str:
    """A per-process temp directory for ``--keep-*`` artifacts (removed at exit)."""
    global _dump_dir
    if _dump_dir is None:
        import atexit
        import shutil
        import tempfile

        _dump_dir = tempfile.mkdtemp(prefix="sparkinfer_cute_dump_")
        atexit.register(shutil.rmtree, _dump_dir, True)
    return _dump_dir


def compile_options(extra: str = "") -> str:
    """Options string for ``cute.compile`` (every kernel passes ``options=compile_options()``): the current compile
    target, the flags of enclosing :func:`extra_options` blocks, ``--keep-ptx`` when ``SPARKINFER_KEEP_PTX=1`` (to
    read the PTX from ``compiled.artifacts.PTX``), and ``extra``.

    ``--keep-ptx``/``--keep-cubin`` without ``--dump-dir`` would write into the current directory (the repo root,
    under one name per kernel class shared by all its configs and processes), so a private per-process directory
    is added; the artifacts are read into ``compiled.artifacts`` at compile time."""
    keep_ptx = "--keep-ptx" if os.environ.get("SPARKINFER_KEEP_PTX", "0") not in ("0", "", "false", "no") else ""
    opts = ["--gpu-arch", _arch.compile_target(), *_extra_options, keep_ptx, extra]
    joined = " ".join(o for o in opts if o)
    if "--keep-" in joined and "--dump-dir" not in joined:
        joined += f" --dump-dir={_private_dump_dir()}"
    return joined


# Environment knobs read at import by kernel modules that change the generated code without being compile
# arguments: part of the key, so an A/B run with the knob flipped never loads the other build from the disk cache.
_CODEGEN_ENV = (os.environ.get("SPARKINFER_EARLY_WEIGHTS", "1"),)


def _key(args: tuple, kwargs: dict) -> tuple:
    # A tuple, not a string: this runs on every kernel call (the memo lookup), so it must stay ~1 us.
    return (args, tuple(sorted(kwargs.items())) if kwargs else (), _arch.compile_target(), _arch.kernel_family(),
            _arch.pdl_enabled(), tuple(_extra_options), _CODEGEN_ENV)


def _key_repr(qualname: str, args: tuple, kwargs: dict) -> str:
    return repr((qualname, *_key(args, kwargs)))


def kernel_cache(fn):
    """Memoize a ``compile_*`` function (static, hashable args) in-process and on disk.

    The wrapped function returns a compiled callable (``JitCompiledFunction`` or the reloaded module function); both
    take the same runtime arguments.
    """
    memo: dict[tuple, object] = {}
    qualname = f"{fn.__module__}.{fn.__qualname__}"

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        raw_key = _key(args, kwargs)
        hit = memo.get(raw_key)
        if hit is not None:
            return hit
        # Miss on the call as spelled: normalize to all-keyword with defaults applied, so compile_x(a, b) and
        # compile_x(a, n=b) (the registry calls with keywords) share one entry instead of compiling twice.
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        key = _key((), dict(bound.arguments))
        with _lock:
            hit = memo.get(key)
            if hit is not None:
                memo[raw_key] = hit
                return hit
            t0 = time.perf_counter()
            compiled, source = None, "compile"
            digest = hashlib.sha256(repr((qualname, *key)).encode()).hexdigest()[:24]
            path = cache_dir() / f"{digest}.o"
            if disk_cache_enabled() and path.exists():
                compiled = _load(path)
                source = "disk" if compiled is not None else "compile"
            if compiled is None:
                compiled = fn(*args, **kwargs)
                if disk_cache_enabled():
                    _store(compiled, path)
            dt = time.perf_counter() - t0
            COMPILE_LOG.append(dict(kernel=qualname, args=args, kwargs=kwargs, arch=_arch.compile_target(),
                                    family=_arch.kernel_family(), seconds=dt, source=source, compiled=compiled))
            memo[key] = compiled
            memo[raw_key] = compiled
            return compiled

    wrapper.cache_clear = memo.clear  # type: ignore[attr-defined]
    wrapper.uncached = fn  # type: ignore[attr-defined]
    return wrapper


_FUNC = "kfn"


def _store(compiled, path: Path) -> None:
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        tmpname = f"{path.stem}.{os.getpid()}.tmp"
        with open(path.parent / ".lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                compiled.export_to_c(file_path=str(path.parent), file_name=tmpname, function_prefix=_FUNC)
                os.replace(path.parent / f"{tmpname}.o", path)
            finally:
                for suffix in (".h", ".o"):
                    try:
                        os.unlink(path.parent / f"{tmpname}{suffix}")
                    except FileNotFoundError:
                        pass
                fcntl.flock(lk, fcntl.LOCK_UN)
    except Exception as e:  # a cache write failure must never break a run
        print(f"sparkinfer_cute: kernel cache write failed ({type(e).__name__}: {e})", file=sys.stderr)


def _load(path: Path):
    import cutlass.cute as cute

    try:
        return getattr(cute.runtime.load_module(str(path)), _FUNC)
    except Exception as e:
        try:
            os.replace(path, path.with_suffix(".bad"))
        except OSError:
            pass
        print(f"sparkinfer_cute: quarantined unloadable cached kernel {path.name} ({e})", file=sys.stderr)
        return None
