"""Measuring a step for ``zotune bench``: malloc's peak on the host, resident memory, the
link's copy rates, the bytes the offload engine moves, and the timing meter."""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def host_allocated_bytes() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2): the host's analogue of
    torch.cuda.memory_allocated, free of the RSS that freed-but-kept memory holds. None off glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@contextlib.contextmanager
def host_peak(every: float = 0.0005):
    """Yields a list whose one element becomes the most bytes allocated at once inside the block,
    sampled every ``every`` seconds by a thread (None off glibc)."""
    peak = [host_allocated_bytes()]
    if peak[0] is None:
        yield peak
        return
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], host_allocated_bytes())
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], host_allocated_bytes())


def resident_bytes() -> int | None:
    """The process's resident memory (pinned buffers included); None off Linux."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def link_bandwidth(device: str, size: int = 2**30) -> dict:
    """Pinned host-to-device and device-to-host copy rates (bytes/s) of a ``size``-byte buffer:
    the best of three after a warm-up."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(size, dtype=torch.uint8, device=device)
    rates = {}
    for name, (target, source) in (("h2d", (on_device, host)), ("d2h", (host, on_device))):
        seconds = []
        for _ in range(4):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        rates[name] = size / min(seconds[1:])
    return rates


def _block_bytes(block) -> int:
    return sum(t.numel() * t.element_size() for t in block.host.values())


class Traffic:
    """Bytes the offload engine moves in each step, counted where it starts a copy: a block's upload
    into a slot, and its write-back when its weights changed."""

    def __init__(self, engine):
        self.steps = [[0, 0]]  # [uploaded, written back] per step; the first entry: before any step
        upload, release = engine._upload, engine._release

        def counted_upload(block):
            copies = block.slot is None
            started = upload(block)
            if copies and block.slot is not None:
                self.steps[-1][0] += _block_bytes(block)
            return started

        def counted_release(block):
            if block.slot is not None and block.dirty:
                self.steps[-1][1] += _block_bytes(block)
            release(block)

        engine._upload, engine._release = counted_upload, counted_release

    def per_step(self) -> tuple[float, float]:
        """Mean bytes (uploaded, written back) of the steps after the warm-up, which has no
        pending update to write back."""
        steady = self.steps[2:] or self.steps[1:]
        return tuple(statistics.mean(step[i] for step in steady) for i in (0, 1))


def offload_columns(engine, traffic: Traffic) -> dict:
    upload, write_back = traffic.per_step()
    rss = resident_bytes()
    return {"host_gib": engine.host_bytes / 2**30, "rss_gib": None if rss is None else rss / 2**30,
            "upload_gb": upload / 1e9, "writeback_gb": write_back / 1e9}


def link_columns(row: dict, link: dict | None) -> dict:
    """The link's rates, and the floor they set on the row's traffic: uploads and write-backs run on
    their own streams, both ways of the link at once."""
    if link is None:  # a CPU "device": no link
        return {"h2d_gb_per_s": None, "d2h_gb_per_s": None, "floor_seconds": None}
    return {"h2d_gb_per_s": link["h2d"] / 1e9, "d2h_gb_per_s": link["d2h"] / 1e9,
            "floor_seconds": max(row["upload_gb"] * 1e9 / link["h2d"], row["writeback_gb"] * 1e9 / link["d2h"])}


class Meter:
    """Median time of ``repeats`` steps after a warm-up, and the peak memory of a step: on a GPU
    max_memory_allocated over the timed steps; on the CPU malloc's peak during one more step,
    untimed (the sampling thread would slow the timed ones), less what the process held besides
    the model when the method began (``host_baseline``, set per method)."""

    def __init__(self, device: str, repeats: int):
        self.device, self.repeats, self.cuda = device, repeats, device.startswith("cuda")
        self.host_baseline: int | None = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> dict:
        fn()  # warm-up: kernels, allocator, numba compilation, optimizer state
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        peak = None
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
        elif self.host_baseline is not None:
            with host_peak() as host:
                fn()
            peak = (host[0] - self.host_baseline) / 2**30
        return {"seconds": statistics.median(samples), "peak_gib": peak}
