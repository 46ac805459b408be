"""Streams and events (thin wrappers over CUstream / CUevent that destroy themselves)."""

from __future__ import annotations

from ._driver import check, driver
from .device import get_device


class Stream:
    """A CUDA stream. ``.handle`` (int) and ``.cu`` (``CUstream``, what compiled CuTe functions take).

    ``non_blocking=False`` (default) creates a blocking stream: it synchronizes with the legacy NULL stream, so the
    simple synchronous copies (``cuMemcpyHtoD``/``DtoH``) are ordered against kernels launched here.
    """

    def __init__(self, non_blocking: bool = False, *, _handle=None):
        self.device = get_device()
        cu = driver()
        if _handle is not None:
            self.cu = _handle
            self._owned = False
        else:
            flags = cu.CUstream_flags.CU_STREAM_NON_BLOCKING if non_blocking else cu.CUstream_flags.CU_STREAM_DEFAULT
            self.cu = check(cu.cuStreamCreate(int(flags)), "cuStreamCreate")
            self._owned = True
        self.handle = int(self.cu)

    @classmethod
    def wrap(cls, handle: int) -> "Stream":
        """Wrap an existing stream handle (not destroyed by us)."""
        return cls(_handle=driver().CUstream(int(handle)))

    def synchronize(self) -> None:
        check(driver().cuStreamSynchronize(self.cu), "cuStreamSynchronize")

    def is_capturing(self) -> bool:
        cu = driver()
        status = check(cu.cuStreamIsCapturing(self.cu), "cuStreamIsCapturing")
        return status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE

    def wait_event(self, event: "Event") -> None:
        check(driver().cuStreamWaitEvent(self.cu, event.cu, 0), "cuStreamWaitEvent")

    def __int__(self) -> int:
        return self.handle

    def __repr__(self) -> str:
        return f"Stream(handle=0x{self.handle:x})"

    def __del__(self):
        if getattr(self, "_owned", False):
            try:
                driver().cuStreamDestroy(self.cu)
            except Exception:
                pass
            self._owned = False


_default_streams: dict[int, Stream] = {}


def default_stream() -> Stream:
    """The package's stream for the current device: one blocking stream created on first use (not the legacy NULL
    stream, so it can be captured into a CUDA graph)."""
    dev = get_device()
    s = _default_streams.get(dev.ordinal)
    if s is None:
        s = _default_streams[dev.ordinal] = Stream()
    return s


def resolve_stream(stream) -> Stream:
    """None -> default_stream(); a Stream -> itself; an int / CUstream handle -> wrapped."""
    if stream is None:
        return default_stream()
    if isinstance(stream, Stream):
        return stream
    return Stream.wrap(int(stream))


class Event:
    """A CUDA event; ``timing=False`` makes a cheaper sync-only event."""

    def __init__(self, timing: bool = True):
        get_device()
        cu = driver()
        flags = cu.CUevent_flags.CU_EVENT_DEFAULT if timing else cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self.cu = check(cu.cuEventCreate(int(flags)), "cuEventCreate")

    def record(self, stream=None) -> "Event":
        check(driver().cuEventRecord(self.cu, resolve_stream(stream).cu), "cuEventRecord")
        return self

    def synchronize(self) -> None:
        check(driver().cuEventSynchronize(self.cu), "cuEventSynchronize")

    def query(self) -> bool:
        """True when all work captured by the last record() has completed."""
        cu = driver()
        err = cu.cuEventQuery(self.cu)
        err = err[0] if isinstance(err, tuple) else err
        if err == cu.CUresult.CUDA_ERROR_NOT_READY:
            return False
        check(err, "cuEventQuery")
        return True

    def __del__(self):
        try:
            driver().cuEventDestroy(self.cu)
        except Exception:
            pass


def elapsed_ms(start: Event, end: Event) -> float:
    """Milliseconds between two recorded events (synchronizes on ``end``)."""
    end.synchronize()
    return float(check(driver().cuEventElapsedTime(start.cu, end.cu), "cuEventElapsedTime"))
