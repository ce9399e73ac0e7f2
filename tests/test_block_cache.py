"""The fast inference path's CPU block cache (csrc/cpu/block_cache.cpp, solo_fast._cpu.block_cache).

Once installed it is torch's CPU allocator for the rest of the process (so every test after
the first fast-path predict runs on it, as a user's process does); these tests hold it to
what the file comment promises: blocks reused inside scopes only and kept only when freed
inside one, a bound on what it holds,
no page faults for a repeated size, oneDNN's raw allocations freed by the right hands,
identical results with it and without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import solo_fast
from solo_fast import _cpu, _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension solo_fast._C")

MB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> str:
    """Runs ``code`` in a fresh interpreter (the allocator is process-wide state)."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_blocks_are_reused_inside_a_scope_only():
    _cpu.empty_cache()  # earlier tests' idle blocks could serve the request as well
    with _cpu.block_cache() as active:
        assert active
        a = torch.empty(8 * MB, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        before = _cpu.cache_info()
        b = torch.empty(8 * MB - 4096, dtype=torch.uint8)  # same size class
        after = _cpu.cache_info()
        assert b.data_ptr() == ptr
        assert after["hits"] == before["hits"] + 1
        del b
    # Outside a scope a request goes to torch's default allocator: not counted, not served
    # from the idle blocks.
    before = _cpu.cache_info()
    c = torch.empty(8 * MB, dtype=torch.uint8)
    assert _cpu.cache_info()["in_use"] == before["in_use"]
    assert (_cpu.cache_info()["hits"], _cpu.cache_info()["misses"]) == (before["hits"], before["misses"])
    del c


def test_small_requests_are_not_cached():
    with _cpu.block_cache():
        before = _cpu.cache_info()
        x = torch.empty(1000)  # 4 KB
        assert _cpu.cache_info()["in_use"] == before["in_use"]
        del x


def test_live_tensors_keep_their_values_while_blocks_are_recycled():
    torch.manual_seed(0)
    with _cpu.block_cache():
        keep = [torch.randn(300_000 + 1000 * i) for i in range(20)]
        copies = [t.clone() for t in keep]
        for _ in range(3):
            scratch = [torch.full((300_000 + 1000 * i,), float(i)) for i in range(20)]
            del scratch
        for t, c in zip(keep, copies):
            assert torch.equal(t, c)
        # A tensor made inside and kept past the scope is unharmed meanwhile.
        late = torch.arange(1_000_000, dtype=torch.float32)
    assert torch.equal(late, torch.arange(1_000_000, dtype=torch.float32))
    del late


def test_a_block_freed_outside_every_scope_goes_back_to_the_os():
    # What predict returns and the caller lets go later is not kept: the cache holds the
    # network's working set, not results a caller once held.
    _cpu.empty_cache()
    with _cpu.block_cache():
        result = torch.empty(16 * MB, dtype=torch.uint8)
        scratch = torch.empty(16 * MB, dtype=torch.uint8)
        del scratch  # freed inside: kept
        assert _cpu.cache_info()["idle"] >= 16 * MB
    held = _cpu.cache_info()
    del result  # freed outside
    after = _cpu.cache_info()
    assert after["idle"] == held["idle"]
    assert after["in_use"] == held["in_use"] - 16 * MB


def test_what_it_holds_stays_under_twice_its_peak():
    _cpu.empty_cache()
    with _cpu.block_cache():
        for n in range(1, 60):  # ever-changing sizes: every request misses
            t = torch.empty(n * MB // 3, dtype=torch.uint8)
            del t
        info = _cpu.cache_info()
        assert info["misses"] > 0
        assert info["in_use"] + info["idle"] <= 2 * info["peak_in_use"]


def test_the_peak_counts_blocks_served_from_the_idle_list():
    _cpu.empty_cache()
    with _cpu.block_cache():
        a = torch.empty(8 * MB, dtype=torch.uint8)
        del a
        b = torch.empty(16 * MB, dtype=torch.uint8)
        del b
        a, b = torch.empty(8 * MB, dtype=torch.uint8), torch.empty(16 * MB, dtype=torch.uint8)  # two hits
        info = _cpu.cache_info()
        assert info["in_use"] >= 24 * MB and info["peak_in_use"] >= info["in_use"]
        del a, b


def test_empty_cache_returns_the_idle_blocks():
    with _cpu.block_cache():
        t = torch.empty(16 * MB, dtype=torch.uint8)
        del t
    assert _cpu.cache_info()["idle"] >= 16 * MB
    freed = _cpu.empty_cache()
    assert freed >= 16 * MB
    assert _cpu.cache_info()["idle"] == 0


def test_a_repeated_size_faults_no_pages():
    # 64 MB is over glibc's largest mmap threshold: without the cache every such tensor is a
    # fresh mapping whose 16k pages fault in when written.
    code = """
import resource, torch, solo_fast
from solo_fast import _cpu
def faults(fn):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
def touch():
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(faults(touch), faults(touch))
with _cpu.block_cache() as active:
    assert active
    touch()
    print(faults(touch), faults(touch))
"""
    plain, cached = [list(map(int, line.split())) for line in _run(code).split("\n")[:2]]
    assert min(plain) > 10_000
    assert max(cached) < 200


def test_switched_off_by_the_environment():
    code = """
import torch, solo_fast
from solo_fast import _cpu
with _cpu.block_cache() as active:
    print(active, torch.ops.solo_fast.block_cache_stats()[-1])
"""
    assert _run(code, SOLO_FAST_CPU_BLOCK_CACHE="0").split() == ["False", "0"]


def test_onednn_buffers_made_inside_and_freed_outside_and_the_reverse():
    # oneDNN allocates and frees through whichever allocator is current (raw_allocate /
    # raw_deallocate); the cache stays installed, and frees what the default allocator made.
    x = torch.randn(1, 64, 96, 96)
    w = torch.randn(64, 64, 3, 3)
    outside = x.to_mkldnn()
    with _cpu.block_cache():
        inside = x.to_mkldnn()
        y = torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), w, padding=1)
        del outside  # made by the default allocator, freed under the cache
    ref = torch.nn.functional.conv2d(x, w, padding=1)
    assert torch.allclose(y, ref, atol=1e-4)
    assert torch.equal(inside.to_dense(), x)
    del inside  # made under the cache, freed outside a scope


def test_threads_in_and_out_of_scopes():
    errors = []

    def work(seed, scoped):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(30):
                ctx = _cpu.block_cache() if scoped else _nullcontext()
                with ctx:
                    a = torch.randn(400_000, generator=g)
                    b = a * 2
                    if not torch.equal(b / 2, a):
                        errors.append("values changed")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(repr(exc))

    import contextlib

    _nullcontext = contextlib.nullcontext
    threads = [threading.Thread(target=work, args=(i, i % 2 == 0)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _cpu.cache_info()["open_scopes"] == 0


def test_predictions_are_identical_with_and_without_the_cache():
    # Reused blocks are not zeroed: a kernel that read memory it had not written would give
    # other results from a recycled block than from a fresh one.
    code = """
import torch, solo_fast
torch.manual_seed(0)
model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, min_size=96, max_size=128).eval()
with torch.no_grad():
    model.mask_head.conv_cls.bias[0] = -1.0
img = (torch.rand(3, 100, 120) * 255).to(torch.uint8)
outs = [model.predict(img)[0] for _ in range(3)]
torch.save([(o.scores, o.labels, o.masks) for o in outs], OUT)
"""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        results = {}
        for flag in ("1", "0"):
            path = os.path.join(d, f"{flag}.pt")
            _run(code.replace("OUT", repr(path)), SOLO_FAST_CPU_BLOCK_CACHE=flag)
            results[flag] = torch.load(path)
    assert len(results["1"][0][0]) > 0  # the classifier fires: post-processing runs too
    for with_cache, without in zip(results["1"], results["0"]):
        for a, b in zip(with_cache, without):
            assert torch.equal(a, b)
    for later in results["1"][1:]:  # the later calls run on recycled blocks
        for a, b in zip(later, results["1"][0]):
            assert torch.equal(a, b)


def test_predict_opens_a_scope_on_the_fast_path_only():
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, min_size=64, max_size=96).eval()
    img = torch.rand(3, 64, 80)
    seen = []
    real = _cpu.block_cache

    def spy():
        seen.append(True)
        return real()

    _cpu.block_cache = spy
    try:
        model.predict(img)
        assert seen
        seen.clear()
        with solo_fast.use_backend("reference"):
            model.predict(img)
        assert not seen
    finally:
        _cpu.block_cache = real


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_inside_a_scope_starts_outside_it():
    # A DataLoader worker forked while predict runs in another thread: its cache has no
    # open scope (its allocations go to the default allocator) and no held lock.
    with _cpu.block_cache():
        keep = torch.ones(1 << 20)
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            torch.set_num_threads(1)  # as a DataLoader worker: OpenMP's threads are not forked
            ok = _cpu.cache_info()["open_scopes"] == 0
            t = torch.full((1 << 20,), 2.0)
            ok = ok and float(t.sum()) == 2.0 * (1 << 20) and float(keep.sum()) == float(1 << 20)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
