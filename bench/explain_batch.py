"""ExplainBatch throughput: N SST-2 test sentences as one ExplainBatch operation against a
`pairdots serve` process on a loopback port, against the same sentences sent as single
Explain calls one after another (`--compare K` of them).

By default the served bundle is the tiny test bundle (built in a temporary directory);
`--bundles ROOT --model NAME` serves real bundles (e.g. bundles/ minilm-sst2: run it under
`flock /work/heavy.lock`, it loads ~9 GB). Prints the progress seen, the counts, wall time,
inputs/s (batch, and single calls), and writes bench/results/explain_batch[_<model>].json.

    PYTHONPATH=server:client python3 bench/explain_batch.py [--inputs 200] [--top-words 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result
from _served import Served, tiny_root


def sentences(n: int) -> list[str]:
    from pairdots_server.storage.data import default_sst2_dir, read_examples

    return [e.text for e in read_examples(default_sst2_dir() / "test.tsv", limit=n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=200)
    ap.add_argument("--compare", type=int, default=20, help="single Explain calls to compare")
    ap.add_argument("--top-words", type=int, default=1)
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--bundles", default=None)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from pairdots import ClientConfig, ExplainBatchOutcome, JobProgress, PairdotsClient

    texts = sentences(a.inputs)
    with tempfile.TemporaryDirectory(prefix="pairdots-bench-batch-") as tmp:
        root = Path(a.bundles) if a.bundles else tiny_root(Path(tmp) / "bundles")
        server = Served(root, Path(tmp) / "jobs.sqlite3", threads=a.threads)
        try:
            cfg = ClientConfig(address=server.address, default_timeout_s=600)
            with PairdotsClient(cfg) as client:
                client.explain(texts[0], model=a.model, top_words=a.top_words)  # warm-up
                seen: list[JobProgress] = []
                t0 = time.perf_counter()
                op = client.explain_batch(
                    texts, model=a.model, top_words=a.top_words, examples_per_word=a.examples
                )
                outcome = client.wait_operation(op.name, timeout=24 * 3600, progress=seen.append)
                batch_wall = time.perf_counter() - t0
                assert isinstance(outcome, ExplainBatchOutcome)
                lines = Path(outcome.results_path).read_text(encoding="utf-8").splitlines()
                t1 = time.perf_counter()
                for text in texts[: a.compare]:
                    client.explain(
                        text, model=a.model, top_words=a.top_words, examples_per_word=a.examples
                    )
                single_wall = time.perf_counter() - t1
            rss = server.rss_mb()
        finally:
            server.stop()
    progress = [(p.stage, p.done, p.total) for p in seen]
    result = {
        "model": a.model,
        "inputs": len(texts),
        "top_words": a.top_words,
        "examples_per_word": a.examples,
        "server_threads": a.threads,
        "succeeded": outcome.succeeded_count,
        "failed": outcome.failed_count,
        "result_lines": len(lines),
        "progress_reports": len(progress),
        "last_progress": progress[-3:],
        "batch_wall_s": round(batch_wall, 2),
        "batch_inputs_per_s": round(len(texts) / batch_wall, 3),
        "server_inputs_per_s": round(outcome.inputs_per_second, 3),
        "single_calls": a.compare,
        "single_inputs_per_s": round(a.compare / single_wall, 3) if a.compare else None,
        "server_rss_mb": round(rss, 1),
    }
    print(
        f"{outcome.succeeded_count}/{len(texts)} explained, {len(lines)} JSONL lines, "
        f"{len(progress)} progress reports; batch {result['batch_inputs_per_s']} inputs/s, "
        f"single Explain calls {result['single_inputs_per_s']} inputs/s"
    )
    name = "explain_batch" if a.model == "tiny" else f"explain_batch_{a.model}"
    write_result(name, result)
    print(json.dumps(result))
    return 0 if outcome.failed_count == 0 and len(lines) == len(texts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
