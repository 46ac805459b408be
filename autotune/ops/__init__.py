"""One adapter module per tunable kernel family: its config space, validity check, default, compile call and GPU
runner. Each module's ``_bind()`` holds every name it takes from ``sparkinfer_cute.kernels`` (the one place to fix
when a kernel module moves or renames). Imported by ``autotune.registry.load_ops``; kernel modules (and cutlass)
are imported only when a function needs them."""
