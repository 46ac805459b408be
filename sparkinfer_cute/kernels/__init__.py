"""CuTe DSL kernels (one kernel family per module, variants as static flags) plus the compile gate.

Importing this package is cheap: it does not import cutlass. Kernel modules import cutlass themselves; the
registry (:mod:`.registry`) imports every kernel module on demand (``load_all_kernels``).
"""
