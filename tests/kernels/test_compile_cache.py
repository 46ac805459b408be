

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
