"""Load test: N concurrent typed-client users × M Explain calls each against a pairdots server.

By default a server is started in this process on a loopback port, serving a tiny bundle
(built in a temporary directory in ~10 s, with a candidate index and low-rank curvature, like
the server tests); `--bundles ROOT` serves existing bundles instead and `--address host:port`
drives a running server (then RSS is the client process only).

Each user is one thread with its own PairdotsClient (its own channel), sending Explain with
`--top-words` salient words (default 1: saliency + influence with the bundle's default
solver). The server's bounded queue turns excess load into RESOURCE_EXHAUSTED with RetryInfo,
which the client retries (`--max-retries`); a call that still finds the server full fails with
RESOURCE_EXHAUSTED — the designed overload answer, the only error this bench accepts.

Prints requests, outcomes by status code, latency p50/p99 (per call, retries included),
throughput, peak RSS growth (VmRSS sampled every 20 ms from /proc/self/status, minus VmRSS
just before the load) and, last, one JSON line. Exit status 1 if any call failed with a code
other than RESOURCE_EXHAUSTED.

    PYTHONPATH=server:client python bench/load.py [--clients 16] [--requests 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SENTENCES = [
    "i loved it , a great movie !",
    "a gripping , funny and moving film",
    "the acting is wooden but the story is moving",
    "dull , tedious and far too long",
    "an utterly charming comedy",
    "the plot makes no sense at all",
    "a beautiful , heartfelt story",
    "boring characters and a lazy script",
    "one of the best films of the year",
    "i wanted my money back",
    "smart , sharp and very funny",
    "a mess from start to finish",
    "the music is lovely",
    "it never finds its footing",
    "a warm and generous film",
    "painfully slow and predictable",
]


def rss_kib(field: str = "VmRSS") -> int:
    """Resident set size (or VmHWM, the peak) of this process in KiB, from /proc."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples VmRSS every `interval_s` in a thread; `peak` is the largest seen."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib())
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib())


def build_tiny_root(root: Path) -> Path:
    """<root>/tiny: the tiny test bundle with a candidate index and low-rank curvature."""
    from pairdots_server.testing import make_tiny_root

    return make_tiny_root(root)


@contextmanager
def local_server(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """Start a server in this process (its own event-loop thread); yield (address, App)."""
    from pairdots_server.config import ServerConfig
    from pairdots_server.rpc.app import create_server

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.bundles) if args.bundles else build_tiny_root(Path(tmp) / "bundles")
        config = ServerConfig(bundles=root, port=0, jobs_db=Path(tmp) / "jobs.sqlite3",
                              max_workers=args.max_workers, max_queue=args.max_queue,
                              grace_s=5)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        app, port = asyncio.run_coroutine_threadsafe(create_server(config), loop).result(600)
        try:
            yield f"127.0.0.1:{port}", app
        finally:
            asyncio.run_coroutine_threadsafe(app.stop(5), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


def user(address: str, index: int, args: argparse.Namespace, barrier: threading.Barrier,
         out: list[tuple[str, float]]) -> None:
    """One client: its own channel, `args.requests` Explain calls one after another."""
    from pairdots import ClientConfig, PairdotsClient, PairdotsError

    config = ClientConfig(address=address, default_model=args.model,
                          max_retries=args.max_retries, default_timeout_s=args.timeout)
    with PairdotsClient(config) as client:
        barrier.wait()
        for k in range(args.requests):
            text = SENTENCES[(index + k) % len(SENTENCES)]
            start = time.perf_counter()
            try:
                client.explain(text, top_words=args.top_words, examples_per_word=3)
                code = "OK"
            except PairdotsError as exc:
                code = exc.code.name
            out.append((code, time.perf_counter() - start))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def server_codes(app: Any) -> dict[str, int]:
    """Explain answers by status code as the server counted them (every attempt, retries
    included), from its Prometheus registry."""
    out: Counter[str] = Counter()
    for metric in app.metrics.registry.collect():
        for sample in metric.samples:
            if (sample.name == "pairdots_requests_total"
                    and sample.labels.get("method", "").endswith("Explain")):
                out[sample.labels["code"]] += int(sample.value)
    return dict(sorted(out.items()))


def run(address: str, args: argparse.Namespace, app: Any = None) -> dict[str, Any]:
    from pairdots import ClientConfig, PairdotsClient

    with PairdotsClient(ClientConfig(address=address, default_model=args.model)) as warm:
        warm.explain(SENTENCES[0], top_words=args.top_words, examples_per_word=3)
    results: list[tuple[str, float]] = []
    barrier = threading.Barrier(args.clients + 1)
    threads = [threading.Thread(target=user, args=(address, i, args, barrier, results))
               for i in range(args.clients)]
    rss_before = rss_kib()
    rss = RssSampler()
    rss.start()
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rss.stop()
    codes = Counter(code for code, _ in results)
    ok = [s for code, s in results if code == "OK"]
    every = [s for _, s in results]
    unexpected = {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    return {
        "clients": args.clients, "requests_per_client": args.requests,
        "requests": len(results), "ok": codes.get("OK", 0),
        "errors_by_code": {c: n for c, n in sorted(codes.items()) if c != "OK"},
        "unexpected_errors": unexpected,
        "p50_s": round(percentile(ok, 50), 4), "p99_s": round(percentile(ok, 99), 4),
        "p50_all_s": round(percentile(every, 50), 4), "p99_all_s": round(percentile(every, 99), 4),
        "wall_s": round(wall, 2), "ok_per_s": round(len(ok) / wall, 2),
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_peak_mib": round(rss.peak / 1024, 1),
        "peak_rss_growth_mib": round((rss.peak - rss_before) / 1024, 1),
        "rss_after_mib": round(rss_kib() / 1024, 1),
        "server_attempts_by_code": server_codes(app) if app is not None else None,
        "server": "remote" if args.address else "in-process",
        "max_workers": None if args.address else args.max_workers,
        "max_queue": None if args.address else args.max_queue,
        "top_words": args.top_words, "max_retries": args.max_retries,
        "torch_threads": None if args.address else args.threads,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="a running server (default: start one here)")
    p.add_argument("--bundles", default=None, help="bundle root to serve (default: tiny, built)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=10, help="Explain calls per client")
    p.add_argument("--top-words", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=1, help="in-process server workers")
    p.add_argument("--max-queue", type=int, default=8, help="in-process server queue")
    p.add_argument("--max-retries", type=int, default=3, help="client retries (busy/unavailable)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-call deadline, seconds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (in-process)")
    args = p.parse_args(argv)

    if args.address:
        summary = run(args.address, args)
    else:
        import torch

        torch.set_num_threads(args.threads)
        with local_server(args) as (address, app):
            summary = run(address, args, app)
    print(f"requests {summary['requests']} ({summary['clients']} clients × "
          f"{summary['requests_per_client']}), ok {summary['ok']}, "
          f"errors by code {summary['errors_by_code'] or '{}'}")
    print(f"latency of successful calls p50 {summary['p50_s']:.3f} s, p99 {summary['p99_s']:.3f} s"
          f" (all calls p50 {summary['p50_all_s']:.3f} s, p99 {summary['p99_all_s']:.3f} s); "
          f"{summary['ok_per_s']:.2f} ok/s over {summary['wall_s']:.1f} s")
    print(f"RSS {summary['rss_before_mib']} MiB before, peak {summary['rss_peak_mib']} MiB "
          f"(growth {summary['peak_rss_growth_mib']} MiB), {summary['rss_after_mib']} MiB after")
    if summary["server_attempts_by_code"] is not None:
        print(f"server-side Explain attempts by code (retries included, warm-up call too): "
              f"{summary['server_attempts_by_code']}")
    if summary["unexpected_errors"]:
        print(f"UNEXPECTED errors: {summary['unexpected_errors']}", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if summary["unexpected_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
