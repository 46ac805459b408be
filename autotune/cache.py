"""The autotune cache: one JSON file, ``$SPARKINFER_CACHE_DIR/autotune.json`` (default
``~/.cache/sparkinfer_cute/autotune.json``, the root the kernel disk cache of ``kernels/compile.py`` uses).

Layout::

    {"format": 1,
     "devices": {"NVIDIA H100 80GB HBM3|132|sm_90": {
         "meta": {"gpu": ..., "sm_count": ..., "compute_capability": "9.0", "driver": 12080, "cutlass_dsl": "4.8.1",
                  "source_fingerprint": ..., "autotune_fingerprint": ..., "kernel_family": "sm120",
                  "compile_target": "sm_90a", "pdl": true},
         "entries": {"gemv_q8": {"qtype=Q4_K,n_in=2048,n_out=4096": {"config": {...}, "default": {...},
                                                                     "us": ..., "default_us": ..., ...}}}}}}

One block per GPU model (name + SM count + compute capability), so two GPUs share the file. A block is used only
when its whole ``meta`` equals the current one: another driver, DSL version, kernel source (the fingerprint of
``kernels/compile.py``), autotuner source, kernel family or PDL setting means the timings may not hold, so the block
is ignored (never trusted) and the next tuning run replaces it. A file that is not valid JSON of this layout is
ignored with a one-line warning (and replaced by the next write).

Concurrent processes: every write is read-merge-write under an exclusive ``fcntl`` lock on ``autotune.json.lock``,
through a temp file and an atomic ``os.replace``; readers need no lock (they see the old or the new file, whole).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
FILE_NAME = "autotune.json"


def cache_path() -> Path:
    """``autotune.json`` beside the kernel disk cache (same ``SPARKINFER_CACHE_DIR`` root)."""
    from sparkinfer_cute.kernels.compile import cache_dir

    return cache_dir().parents[1] / FILE_NAME  # cache_dir() is <root>/kernels/<fingerprint>


@dataclass(frozen=True)
class DeviceIdentity:
    """What identifies a GPU for tuning purposes (a runtime ``Device`` plus the driver version)."""

    name: str
    sm_count: int
    capability: tuple[int, int]
    driver_version: int

    @classmethod
    def of(cls, device) -> "DeviceIdentity":
        """From a ``runtime.Device`` (queries the driver version), or an identity already."""
        if isinstance(device, DeviceIdentity):
            return device
        from sparkinfer_cute.runtime._driver import check, driver

        ver = int(check(driver().cuDriverGetVersion(), "cuDriverGetVersion"))
        return cls(device.name, int(device.sm_count), tuple(device.capability), ver)

    @property
    def key(self) -> str:
        return f"{self.name}|{self.sm_count}|sm_{self.capability[0]}{self.capability[1]}"


@functools.cache
def autotune_fingerprint() -> str:
    """Hash of the autotuner's own sources (config spaces, references, timing): results of another search are
    not reused. (An editable install's ``source_fingerprint`` covers ``sparkinfer_cute/`` only, not ``autotune/``.)"""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def current_metadata(ident: DeviceIdentity) -> dict:
    """The metadata block tuned entries are valid for: the GPU, driver, DSL version, kernel and autotuner sources,
    and the compile settings that change the kernels (family, target, PDL)."""
    from importlib.metadata import PackageNotFoundError, version

    from sparkinfer_cute.kernels import arch
    from sparkinfer_cute.kernels.compile import source_fingerprint

    try:
        dsl = version("nvidia-cutlass-dsl")
    except PackageNotFoundError:
        dsl = "absent"
    return {
        "gpu": ident.name,
        "sm_count": ident.sm_count,
        "compute_capability": f"{ident.capability[0]}.{ident.capability[1]}",
        "driver": ident.driver_version,
        "cutlass_dsl": dsl,
        "source_fingerprint": source_fingerprint(),
        "autotune_fingerprint": autotune_fingerprint(),
        "kernel_family": arch.kernel_family(),
        "compile_target": arch.compile_target(),
        "pdl": arch.pdl_enabled(),
    }


def _warn(msg: str) -> None:
    print(f"sparkinfer_cute.autotune: {msg}", file=sys.stderr)


def _valid_layout(data) -> bool:
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        return False
    for block in data["devices"].values():
        if not (isinstance(block, dict) and isinstance(block.get("meta"), dict)
                and isinstance(block.get("entries"), dict)):
            return False
        for by_shape in block["entries"].values():
            if not (isinstance(by_shape, dict)
                    and all(isinstance(e, dict) and isinstance(e.get("config"), dict) for e in by_shape.values())):
                return False
    return True


class TuneCache:
    """Read and update one autotune JSON file (default :func:`cache_path`)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else cache_path()

    # ------------------------------------------------------------------ reading
    def read(self, *, warn: bool = True) -> dict | None:
        """The whole file, or None when it is absent or unusable (corrupt, another format: warned once here)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            if warn:
                _warn(f"cannot read {self.path} ({type(e).__name__}: {e}); using default kernel configs")
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            if warn:
                _warn(f"ignoring corrupt cache file {self.path} ({type(e).__name__}: {e})")
            return None
        if not _valid_layout(data):
            if warn:
                _warn(f"ignoring cache file {self.path}: not an autotune cache of format {FORMAT}")
            return None
        return data

    def block_for(self, ident: DeviceIdentity, meta: dict, data: dict | None = None) -> tuple[dict, str]:
        """(entries {op: {shape_key: entry}}, status) of the block for ``ident`` when its metadata equals ``meta``;
        else ({}, the reason nothing is used)."""
        data = self.read() if data is None else data
        if data is None:
            return {}, "no autotune cache" if not self.path.exists() else "autotune cache unreadable"
        block = data["devices"].get(ident.key)
        if block is None:
            return {}, f"no tuned configs for {ident.name}"
        if block["meta"] != meta:
            diff = sorted(k for k in set(meta) | set(block["meta"]) if meta.get(k) != block["meta"].get(k))
            return {}, f"tuned configs ignored: made for another {', '.join(diff)}"
        return block["entries"], "ok"

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def put(self, ident: DeviceIdentity, meta: dict, entries: dict[str, dict[str, dict]]) -> None:
        """Merge ``entries`` ({op: {shape_key: entry}}) into the block of ``ident`` (read-merge-write under the lock).
        A block with other metadata is replaced; a corrupt file is replaced by a fresh one."""
        with self._locked():
            data = self.read(warn=False) or {"format": FORMAT, "devices": {}}
            block = data["devices"].get(ident.key)
            if block is None or block["meta"] != meta:
                block = data["devices"][ident.key] = {"meta": meta, "entries": {}}
            for op, by_shape in entries.items():
                block["entries"].setdefault(op, {}).update(by_shape)
            self._write(data)

    def clear(self) -> bool:
        """Delete the file (under the lock); True when there was one."""
        with self._locked():
            try:
                self.path.unlink()
                return True
            except FileNotFoundError:
                return False


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
