"""Notebook-style walk-through: run a kernel on numpy data, compare with its float64 reference, then the
device-resident path a model uses (no host round trips), and a CUDA graph replay.

    python examples/notebook_rmsnorm.py

Parts 2 and 3 need a CUDA GPU. Without one, part 1's three lines run with the norm computed by the CPU reference
(``sparkinfer_cute.reference.ops.rmsnorm`` in float32, what the CPU backend computes), and the script says so.
"""

import numpy as np

from sparkinfer_cute.engine import gpu_usable
from sparkinfer_cute.reference import ops

on_gpu, why = gpu_usable()
if on_gpu:
    from sparkinfer_cute.kernels.rmsnorm import rmsnorm

    print(f"GPU: {why}")
else:
    def rmsnorm(x, w, eps=1e-6):
        return ops.rmsnorm(x, w, eps)  # float32 numpy

    print(f"{why}: rmsnorm runs on the float32 CPU reference instead of the GPU kernel")

# %% 1. numpy in -> numpy out, float64 reference, relative error (three lines)
x = np.random.default_rng().standard_normal((4, 2048)).astype(np.float32)
w = np.random.default_rng().standard_normal(2048).astype(np.float32)
y, ref = rmsnorm(x, w, 1e-6), ops.rmsnorm(x.astype(np.float64), w.astype(np.float64), 1e-6)
err = np.abs(y - ref).max() / np.abs(ref).max()
print(f"rmsnorm rel err vs float64: {err:.2e} ({'GPU kernel' if on_gpu else 'numpy float32'})")
assert err < 1e-5

if not on_gpu:
    print("parts 2 (device-resident residual + norm) and 3 (CUDA graph replay) need a CUDA GPU: skipped")
    raise SystemExit(0)

from sparkinfer_cute.kernels.rmsnorm import rmsnorm_residual  # noqa: E402
from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Event, Stream, elapsed_ms  # noqa: E402

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
