"""Notebook-style walk-through: run a kernel on numpy data, compare with its float64 reference, then the
device-resident path a model uses (no host round trips), and a CUDA graph replay.

Run on a GPU host:  python examples/notebook_rmsnorm.py
"""

import numpy as np

from sparkinfer_cute.kernels.rmsnorm import rmsnorm, rmsnorm_residual
from sparkinfer_cute.reference.kernel_refs import rel_err, rmsnorm_ref
from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Event, Stream, elapsed_ms, get_device

print(get_device())

# %% 1. numpy in -> numpy out (three lines)
x = np.random.default_rng(0).standard_normal((4, 2048)).astype(np.float32)
w = np.random.default_rng(1).standard_normal(2048).astype(np.float32)
print("rmsnorm rel err vs float64:", rel_err(rmsnorm(x, w), rmsnorm_ref(x, w)))

# %% 2. device-resident: residual add + norm in one kernel, outputs stay on the GPU
stream = Stream()
h = DeviceArray.from_numpy(x, stream)          # residual stream
delta = DeviceArray.from_numpy(x * 0.1, stream)  # a sublayer output
wd = DeviceArray.from_numpy(w, stream)
normed, h = rmsnorm_residual(delta, h, wd, 1e-6, stream=stream)  # h updated in place
print("residual updated:", np.allclose(h.to_numpy(stream), x * 1.1, rtol=1e-6))

# %% 3. capture into a CUDA graph and time replays
with CudaGraph.capture(stream) as g:
    rmsnorm(h, wd, 1e-6, out=normed, stream=stream)
g.keep(h, wd, normed)
e0, e1 = Event(), Event()
e0.record(stream)
for _ in range(100):
    g.replay(stream)
e1.record(stream)
print(f"graph replay: {elapsed_ms(e0, e1) * 10:.2f} us per rmsnorm")
