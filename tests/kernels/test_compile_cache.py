

def test_kernel_cache_positional_and_keyword_calls_share_one_entry():
    """compile_x(a, b) and compile_x(a, n=b) (the registry's spelling) must not compile twice."""
    from sparkinfer_cute.kernels.compile import kernel_cache

    calls = []

    @kernel_cache
    def compile_fake(qtype, n_in, rows=1):
        calls.append((qtype, n_in, rows))
        return object()

    a = compile_fake("Q4_K", 2048)
    b = compile_fake("Q4_K", n_in=2048, rows=1)
    c = compile_fake(qtype="Q4_K", n_in=2048)
    d = compile_fake("Q4_K", 2048, 2)
    assert a is b is c and d is not a
    assert calls == [("Q4_K", 2048, 1), ("Q4_K", 2048, 2)]


def test_codegen_env_knobs_are_in_the_cache_key():
    """SPARKINFER_EARLY_WEIGHTS changes the chunk GEMV's code without being a compile argument (it is read at import):
    the key must differ with it, or an A/B run would load the other build from disk."""
    import subprocess
    import sys

    code = ("from sparkinfer_cute.kernels.compile import _key_repr; "
            "print(_key_repr('k', (1,), {}))")
    outs = {v: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "SPARKINFER_EARLY_WEIGHTS": v}).stdout
            for v in ("0", "1")}
    assert outs["0"] != outs["1"]
