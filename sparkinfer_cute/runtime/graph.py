"""CUDA graph capture / replay of work enqueued on one stream (cuStreamBeginCapture .. cuGraphLaunch).

Warm kernels up (compile + first launch, which loads the module) BEFORE capturing: module loading is not a
capturable operation. Device buffers used inside the graph must stay alive and at the same address for every
replay; :meth:`CudaGraph.keep` holds references for you. Scalars baked into launches are frozen at capture time,
which is why per-step values (e.g. the decode position) are read by kernels from device memory.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import DeviceError
from ._driver import check, driver
from .stream import resolve_stream

_MODES = {
    "global": "CU_STREAM_CAPTURE_MODE_GLOBAL",
    "thread_local": "CU_STREAM_CAPTURE_MODE_THREAD_LOCAL",
    "relaxed": "CU_STREAM_CAPTURE_MODE_RELAXED",
}


class CudaGraph:
    def __init__(self):
        self.graph = None
        self.exec = None
        self.stream = None
        self._keep: list = []

    @classmethod
    @contextmanager
    def capture(cls, stream=None, mode: str = "relaxed"):
        """``with CudaGraph.capture(stream) as g: <launches on stream>`` then ``g.replay()``.

        ``mode="relaxed"`` (default) lets the CuTe DSL launcher make its bookkeeping driver calls during capture;
        ``"thread_local"``/``"global"`` make the driver reject capture-unsafe calls (useful to find them)."""
        s = resolve_stream(stream)
        if s.handle == 0:
            raise DeviceError("cannot capture the legacy NULL stream; use runtime.Stream() or default_stream()")
        cu = driver()
        g = cls()
        g.stream = s
        check(cu.cuStreamBeginCapture(s.cu, getattr(cu.CUstreamCaptureMode, _MODES[mode])), "cuStreamBeginCapture")
        try:
            yield g
        except BaseException:
            res = cu.cuStreamEndCapture(s.cu)
            if res[0] == cu.CUresult.CUDA_SUCCESS and res[1] is not None:
                cu.cuGraphDestroy(res[1])
            raise
        g.graph = check(cu.cuStreamEndCapture(s.cu), "cuStreamEndCapture")
        g.exec = check(cu.cuGraphInstantiate(g.graph, 0), "cuGraphInstantiate")

    def keep(self, *objs) -> "CudaGraph":
        """Hold references (device arrays, workspaces) the graph's launches point into."""
        self._keep.extend(objs)
        return self

    def replay(self, stream=None) -> None:
        """Launch the instantiated graph (asynchronously) on ``stream`` (default: the capture stream)."""
        if self.exec is None:
            raise DeviceError("CudaGraph.replay before a completed capture")
        s = self.stream if stream is None else resolve_stream(stream)
        check(driver().cuGraphLaunch(self.exec, s.cu), "cuGraphLaunch")

    def kernel_nodes(self) -> int:
        """Kernel nodes of the captured graph: the launches one replay runs, counted by the driver (memset and memcpy
        nodes excluded). The GPU test holds the models' declared launch counts against it."""
        if self.graph is None:
            raise DeviceError("CudaGraph.kernel_nodes before a completed capture")
        cu = driver()
        res = check(cu.cuGraphGetNodes(self.graph, 0), "cuGraphGetNodes")
        n = int(res[-1] if isinstance(res, tuple) else res)
        nodes = check(cu.cuGraphGetNodes(self.graph, n), "cuGraphGetNodes")
        nodes = nodes[0] if isinstance(nodes, tuple) else nodes
        kernel = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL
        return sum(1 for node in nodes[:n] if check(cu.cuGraphNodeGetType(node), "cuGraphNodeGetType") == kernel)

    def __del__(self):
        cu = None
        try:
            cu = driver()
            if self.exec is not None:
                cu.cuGraphExecDestroy(self.exec)
            if self.graph is not None:
                cu.cuGraphDestroy(self.graph)
        except Exception:
            pass

