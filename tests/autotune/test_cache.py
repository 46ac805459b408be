"""The autotune cache file and the engine's lookup API, on the CPU (a fake device identity stands for the GPU)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest

from sparkinfer_cute.autotune import describe_sites, describe_tuning, load_tuned
from sparkinfer_cute.autotune.cache import DeviceIdentity, TuneCache, current_metadata

IDENT = DeviceIdentity("NVIDIA Fake 5090", 170, (12, 0), 12080)
OTHER = DeviceIdentity("NVIDIA Fake Spark", 48, (12, 1), 12080)
GEMV_SHAPE = dict(qtype="Q4_K", n_in=2048, n_out=4096)
GEMV_KEY = "qtype=Q4_K,n_in=2048,n_out=4096"


def _entry(cfg, us=3.0):
    return dict(config=cfg, default=dict(mapping="chunk", rows_per_warp=2), us=us, default_us=3.5, timing="cold-l2")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARKINFER_AUTOTUNE", raising=False)
    c = TuneCache()
    assert c.path == tmp_path / "autotune.json"  # beside the kernel disk cache root
    return c


def test_round_trip_and_lookup(cache):
    meta = current_metadata(IDENT)
    cache.put(IDENT, meta, {"gemv_q8": {GEMV_KEY: _entry(dict(mapping="chunk", rows_per_warp=1))}})
    cache.put(IDENT, meta, {"attention_decode": {"n_head=32,n_kv_head=4,head_dim=128,qk_rot=0,ctx=4096":
                                                 _entry(dict(num_splits=16, heads_per_cta=4, keys_per_iter=2))}})
    tuned = load_tuned(IDENT)
    assert tuned.enabled and len(tuned) == 2
    assert tuned.get("gemv_q8", GEMV_SHAPE) == dict(mapping="chunk", rows_per_warp=1)
    assert tuned.get("gemv", GEMV_SHAPE) is None  # the f32 path was not tuned: fall back
    assert tuned.get("gemv_q8", dict(GEMV_SHAPE, n_out=512)) is None
    # attention contexts are bucketed up to a power of two, as the search stored them; extra fields are ignored
    shape = dict(n_head=32, n_kv_head=4, head_dim=128, qk_rot=0, ctx=3000, window=0)
    assert tuned.get("attention_decode", shape) == dict(num_splits=16, heads_per_cta=4, keys_per_iter=2)
    assert tuned.get("attention_decode", dict(shape, ctx=4097)) is None
    # the returned dict is a copy
    tuned.get("gemv_q8", GEMV_SHAPE)["rows_per_warp"] = 99
    assert tuned.get("gemv_q8", GEMV_SHAPE)["rows_per_warp"] == 1
    line = describe_tuning()
    # per call site (op + bucketed shape), not per lookup: two tuned, three defaults
    assert line.startswith("autotune: 2 tuned configs for NVIDIA Fake 5090; tuned config at 2 of 5 call sites, "
                           "default at 3 (cache ")
    # an entry where the search kept the default is applied as cached, and said so
    kept_cfg = {"mapping": "chunk", "rows_per_warp": 2}  # _entry's default
    cache.put(IDENT, meta, {"gemv": {GEMV_KEY: _entry(kept_cfg)}})
    kept = load_tuned(IDENT)
    assert kept.get("gemv", GEMV_SHAPE, where="blk.0.attn_q.weight") == kept_cfg
    assert "1 of the tuned where the search kept the default" in describe_tuning(kept)
    line = ("blk.0.attn_q.weight: gemv [qtype=Q4_K,n_in=2048,n_out=4096] tuned (the default kept): "
            "mapping=chunk rows_per_warp=2")
    assert describe_sites(kept) == [line]
    with pytest.raises(ValueError, match="lacks n_out"):
        tuned.get("gemv_q8", dict(qtype="Q4_K", n_in=2048))
    with pytest.raises(ValueError, match="unknown autotune op"):
        tuned.get("no_such_op", {})


def test_blocks_of_two_gpus_coexist(cache):
    cache.put(IDENT, current_metadata(IDENT), {"gemv": {GEMV_KEY: _entry(dict(mapping="slice", warps_per_row=2))}})
    cache.put(OTHER, current_metadata(OTHER), {"gemv": {GEMV_KEY: _entry(dict(mapping="slice", warps_per_row=4))}})
    assert load_tuned(IDENT).get("gemv", GEMV_SHAPE) == dict(mapping="slice", warps_per_row=2)
    assert load_tuned(OTHER).get("gemv", GEMV_SHAPE) == dict(mapping="slice", warps_per_row=4)
    t = load_tuned(DeviceIdentity("NVIDIA Fake H100", 132, (9, 0), 12080))
    assert not t.enabled and t.get("gemv", GEMV_SHAPE) is None and "no tuned configs" in t.status


@pytest.mark.parametrize("field,value", [("driver", 13000), ("cutlass_dsl", "9.9.9"), ("source_fingerprint", "x"),
                                         ("autotune_fingerprint", "y"), ("kernel_family", "sm90"), ("pdl", False),
                                         ("compile_target", "sm_121a")])
def test_mismatched_metadata_block_is_ignored_then_replaced(cache, field, value):
    meta = current_metadata(IDENT)
    stale = dict(meta, **{field: value})
    cache.put(IDENT, stale, {"gemv": {GEMV_KEY: _entry(dict(mapping="slice", warps_per_row=2))}})
    t = load_tuned(IDENT)
    assert not t.enabled and t.get("gemv", GEMV_SHAPE) is None
    assert t.status == f"tuned configs ignored: made for another {field}"
    assert "defaults" in describe_tuning(t) and field in describe_tuning(t)
    # the next tuning run's write replaces the stale block instead of merging into it
    cache.put(IDENT, meta, {"gemv_q8": {GEMV_KEY: _entry(dict(mapping="slice"))}})
    t = load_tuned(IDENT)
    assert t.enabled and len(t) == 1 and t.get("gemv", GEMV_SHAPE) is None


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"format": 1, "devices": {"x": 3}}',
                                     b'{"format": 99, "devices": {}}', b"",
                                     b'{"format": 1, "devices": {"g": {"meta": {}, "entries": {"gemv": {"s": {}}}}}}'])
def test_corrupt_file_is_ignored_with_a_one_line_warning(cache, capsys, content):
    cache.path.write_bytes(content)
    t = load_tuned(IDENT)
    assert not t.enabled and t.get("gemv", GEMV_SHAPE) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparkinfer_cute.autotune: ignoring") and str(cache.path) in err[0]
    # a write replaces it with a valid file
    cache.put(IDENT, current_metadata(IDENT), {"gemv": {GEMV_KEY: _entry(dict(mapping="slice", warps_per_row=1))}})
    assert load_tuned(IDENT).get("gemv", GEMV_SHAPE) == dict(mapping="slice", warps_per_row=1)


def test_switch_off_disables_lookups(cache, monkeypatch):
    cache.put(IDENT, current_metadata(IDENT), {"gemv": {GEMV_KEY: _entry(dict(mapping="slice", warps_per_row=2))}})
    monkeypatch.setenv("SPARKINFER_AUTOTUNE", "0")
    t = load_tuned(IDENT)
    assert not t.enabled and t.get("gemv", GEMV_SHAPE) is None and len(t) == 0
    assert describe_tuning() == f"autotune: defaults (off (SPARKINFER_AUTOTUNE=0); cache {cache.path})"
    monkeypatch.setenv("SPARKINFER_AUTOTUNE", "1")
    assert load_tuned(IDENT).get("gemv", GEMV_SHAPE) == dict(mapping="slice", warps_per_row=2)


def test_no_gpu_means_nothing_tuned(cache, monkeypatch):
    monkeypatch.setenv("SPARKINFER_NO_GPU", "1")
    from sparkinfer_cute.runtime import device_available

    if device_available():
        pytest.skip("a GPU is present")
    t = load_tuned()
    assert not t.enabled and t.status.startswith("no GPU")


def test_lookup_cost(cache):
    """Start-up: load_tuned plus a decode step's lookups within 0.1 s, with 200 entries cached."""
    meta = current_metadata(IDENT)
    cache.put(IDENT, meta, {"gemv": {f"qtype=Q4_K,n_in=2048,n_out={n}": _entry(dict(mapping="slice", warps_per_row=2))
                                     for n in range(64, 64 * 201, 64)}})
    load_tuned(IDENT).get("gemv", GEMV_SHAPE)  # first-use imports (numpy is the engine's anyway)
    t0 = time.perf_counter()
    t = load_tuned(IDENT)
    for n in range(64, 64 * 101, 64):
        assert t.get("gemv", dict(GEMV_SHAPE, n_out=n)) is not None
    assert time.perf_counter() - t0 <= 0.1


def _writer(path, i, n, ready, go):
    from sparkinfer_cute.autotune.cache import DeviceIdentity, TuneCache, current_metadata

    ident = DeviceIdentity("NVIDIA Fake 5090", 170, (12, 0), 12080)
    c = TuneCache(path)
    meta = current_metadata(ident)
    ready.release()
    go.wait(30)  # all writers start writing together
    for j in range(n):
        c.put(ident, meta, {"gemv": {f"w{i}-{j}": dict(config=dict(i=i, j=j), us=1.0)}})


def test_concurrent_writers_keep_every_entry(cache):
    ctx = mp.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(cache.path), i, 10, ready, go)) for i in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        assert ready.acquire(timeout=60)
    go.set()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    data = json.loads(cache.path.read_text())  # valid JSON
    entries = data["devices"][IDENT.key]["entries"]["gemv"]
    assert set(entries) == {f"w{i}-{j}" for i in range(4) for j in range(10)}
    assert not list(cache.path.parent.glob(".autotune.json.*.tmp"))  # no temp file left behind


def test_clear(cache):
    assert cache.clear() is False
    cache.put(IDENT, current_metadata(IDENT), {"gemv": {GEMV_KEY: _entry(dict(mapping="slice", warps_per_row=2))}})
    assert cache.clear() is True and not cache.path.exists()
    assert load_tuned(IDENT).status == "no autotune cache"
