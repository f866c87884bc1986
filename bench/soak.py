"""Soak a served tiny bundle (issue 14): N client threads (default 16) send Explain calls for
a fixed time (default 10 minutes) while Attack jobs run back to back on the same model. Every
Explain must end OK or RESOURCE_EXHAUSTED with google.rpc.RetryInfo and every job must
succeed; anything else is an undesigned error (exit 1). Reports the server's RSS at the start
(after warm-up), every 30 s, and at the end. Writes bench/results/soak.json.

    PYTHONPATH=server:client nice -n 10 python3 bench/soak.py [--clients 16] [--minutes 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from _results import git_commit
from _served import REPO, Served, tiny_root
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg

TEXTS = ["i loved it !", "the movie was bad .", "a great film .", "this film is not good .",
         "an awful , boring story .", "the cast was funny and the plot was great ."]
TESTS = [pb.LabeledText(text="the movie was bad .", label=0),
         pb.LabeledText(text="a great film .", label=1),
         pb.LabeledText(text="it was boring .", label=0)]


def has_retry_info(err: grpc.RpcError) -> bool:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    return status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
                                      for d in status.details)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--work", default="/tmp/pairdots-bench-tiny")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    root = tiny_root(work / "bundles")
    server = Served(root, work / f"soak-{int(time.time())}.sqlite3", "--max-workers",
                    str(a.max_workers), "--max-queue", str(a.max_queue))
    counts: collections.Counter[str] = collections.Counter()
    jobs: collections.Counter[str] = collections.Counter()
    undesigned: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    rss: list[tuple[float, float]] = []

    def note(key: str, detail: str = "") -> None:
        with lock:
            counts[key] += 1
            if key not in ("OK", "RESOURCE_EXHAUSTED") and len(undesigned) < 50:
                undesigned.append(f"{key}: {detail[:300]}")

    def explainer(k: int) -> None:
        with grpc.insecure_channel(server.address) as ch:
            stub = pbg.PairdotsServiceStub(ch)
            i = k
            while not stop.is_set():
                i += 1
                req = pb.ExplainRequest(model="tiny", text=TEXTS[i % len(TEXTS)], top_words=1,
                                        examples_per_word=2)
                if i % 3 == 0:  # an iterative solve now and then (cached after the first)
                    req.influence.solver.solver = pb.SOLVER_CONJUGATE_GRADIENT
                    req.influence.solver.max_iterations = 10
                    req.influence.solver.seed = i % 7
                try:
                    stub.Explain(req, timeout=60)
                    note("OK")
                except grpc.RpcError as err:
                    code = err.code().name
                    if code == "RESOURCE_EXHAUSTED" and not has_retry_info(err):
                        code = "RESOURCE_EXHAUSTED_WITHOUT_RETRY_INFO"
                    note(code, err.details() or "")
                    if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        time.sleep(0.2)  # what a client does with the retry hint

    def attacker() -> None:
        with grpc.insecure_channel(server.address) as ch:
            stub = pbg.PairdotsServiceStub(ch)
            ops: Any = operations_pb2_grpc.OperationsStub(ch)
            n = 0
            while not stop.is_set():
                n += 1
                req = pb.AttackRequest(model="tiny", examples=TESTS,
                                       mode=pb.ATTACK_MODE_COMBINED, examples_per_test=2,
                                       random_candidates=2, seed=n, request_id=f"soak-{n}")
                req.retrain.enabled = True
                req.retrain.mode = pb.RETRAIN_MODE_SCOPE_ONLY
                req.retrain.epochs = 1
                try:
                    op = stub.Attack(req, timeout=30)
                    while not op.done:
                        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(
                            name=op.name, timeout={"seconds": 10}), timeout=30)
                    if op.HasField("error"):
                        jobs["failed"] += 1
                        with lock:
                            undesigned.append(f"job {op.name} failed: {op.error.code} "
                                              f"{op.error.message[:300]}")
                    else:
                        jobs["succeeded"] += 1
                except grpc.RpcError as err:
                    jobs[f"rpc_{err.code().name}"] += 1
                    if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                        with lock:
                            undesigned.append(f"Attack/Wait: {err.code().name}: {err.details()}")
                    time.sleep(1)

    started = time.monotonic()
    try:
        # warm-up: one Explain of each kind, then the baseline RSS
        with grpc.insecure_channel(server.address) as ch:
            pbg.PairdotsServiceStub(ch).Explain(
                pb.ExplainRequest(model="tiny", text=TEXTS[0], top_words=1), timeout=120)
        rss.append((0.0, server.rss_mb()))
        threads = [threading.Thread(target=explainer, args=(k,)) for k in range(a.clients)]
        threads.append(threading.Thread(target=attacker))
        for t in threads:
            t.start()
        end = started + a.minutes * 60
        while time.monotonic() < end and server.alive():
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            rss.append((round(time.monotonic() - started, 1), server.rss_mb()))
        stop.set()
        for t in threads:
            t.join(120)
        alive = server.alive()
        rss.append((round(time.monotonic() - started, 1), server.rss_mb()))
    finally:
        stop.set()
        server.stop()
    seconds = time.monotonic() - started
    bad = sum(v for k, v in counts.items() if k not in ("OK", "RESOURCE_EXHAUSTED"))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "clients": a.clients,
        "seconds": round(seconds, 1),
        "server": {"max_workers": a.max_workers, "max_queue": a.max_queue},
        "explain_codes": dict(counts.most_common()),
        "explain_calls": sum(counts.values()),
        "jobs": dict(jobs),
        "undesigned_errors": bad + jobs["failed"] + sum(
            v for k, v in jobs.items() if k.startswith("rpc_") and k != "rpc_RESOURCE_EXHAUSTED"),
        "undesigned_examples": undesigned,
        "server_alive_at_end": alive,
        "rss_mb": {"start": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
                   "growth": round(rss[-1][1] - rss[0][1], 1),
                   "samples": [(t, round(m, 1)) for t, m in rss]},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "explain_codes", "jobs",
                                             "undesigned_errors", "rss_mb")}))
    return 0 if result["undesigned_errors"] == 0 and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
