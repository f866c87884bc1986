"""Fuzz every RPC of a served tiny bundle (issue 14): ≥ 10,000 generated requests across
PairdotsService (ListModels, GetModel, Explain, Attack, Repair), google.longrunning.Operations
(Get/List/Cancel/Delete/Wait) and grpc.health.v1, plus malformed request bytes and odd
authorization metadata, from several threads at once. Counts status codes per RPC; any UNKNOWN
or INTERNAL is a failure (exit 1). Writes bench/results/fuzz.json (command, git commit, counts).

    PYTHONPATH=server:client python3 bench/fuzz.py [--requests 10000] [--threads 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from _results import git_commit
from _served import REPO, Served, tiny_root
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg

FORBIDDEN = {"UNKNOWN", "INTERNAL"}
INT32 = (-(2**31), 2**31 - 1)
WEIRD_STRINGS = ["", " ", "\t\n", "a\x00b", "\x01\x02\x03\x1b", "tiny", "TINY", "../tiny",
                 "/etc/passwd", "operations/", "operations/attack-0", "🙂" * 30, "é" * 200,
                 "a" * 8000, "\u200b", "tiny\x00", "operations/" + "a" * 8000]
TEXTS = ["i loved it !", "the movie was bad .", "a great film .", "", " ", "\x01\x02\x03\x1b",
         "good " * 2500, "🙂" * 50, "a\x00b", "not good but not bad", "x"]


def rint(rng: random.Random) -> int:
    return rng.choice([0, 1, -1, 2, 3, 50, 51, 10**6, INT32[0], INT32[1], rng.randint(*INT32)])


def rfloat(rng: random.Random) -> float:
    return rng.choice([0.0, -1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, 0.5, 1.0,
                       rng.uniform(-10, 10)])


def rstr(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(WEIRD_STRINGS)
    return "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 40)))


def solver(rng: random.Random, s: pb.SolverOptions) -> None:
    s.solver = rng.choice([0, 1, 2, 3, 4, 99, -1])
    s.curvature = rng.choice([0, 1, 2, 7])
    for name in ("damping", "scale", "tolerance"):
        if rng.random() < 0.3:
            setattr(s, name, rfloat(rng))
    for name, lo, hi in (("max_iterations", 1, 30), ("repeats", 1, 3), ("batch_size", 1, 16)):
        if rng.random() < 0.3:
            setattr(s, name, rng.randint(lo, hi) if rng.random() < 0.7 else rint(rng))
    if rng.random() < 0.3:
        s.seed = rng.choice([0, 1, 2**45, 2**64 - 1, rng.getrandbits(64)])


def influence(rng: random.Random, inf: pb.InfluenceOptions) -> None:
    solver(rng, inf.solver)
    inf.candidate_search = rng.choice([0, 1, 2, 3, 9])
    inf.candidate_count = rng.choice([0, 5, 20, -1, 10**6])
    inf.token_influence = rng.choice([0, 1, 2, 3, 11])


def explain_req(rng: random.Random) -> pb.ExplainRequest:
    r = pb.ExplainRequest(model=rng.choice(["tiny"] * 6 + [rstr(rng)]),
                          text=rng.choice(TEXTS) if rng.random() < 0.8 else rstr(rng))
    heavy = rng.random() < 0.15  # a real influence computation now and then
    if heavy:
        r.top_words = 1
        r.examples_per_word = rng.choice([1, 3])
        r.influence.solver.solver = rng.choice([pb.SOLVER_LOW_RANK, pb.SOLVER_CONJUGATE_GRADIENT])
        r.influence.solver.max_iterations = 10 if r.influence.solver.solver != 3 else 0
        if r.influence.solver.max_iterations == 0:
            r.influence.solver.ClearField("max_iterations")
    else:
        r.top_words = rng.choice([0, 0, 0, -1, 33, 10**6])
        if rng.random() < 0.3:
            r.word_positions.extend(rng.choice([[99], [-1], [0, 0], list(range(40))]))
        if rng.random() < 0.3:
            r.examples_per_word = rint(rng)
    if rng.random() < 0.3:
        r.target_label = rint(rng)
    if rng.random() < 0.3:
        r.gold_label = rint(rng)
    if rng.random() < 0.3:
        r.saliency.target_function = rng.choice([0, 1, 2, 5])
        r.saliency.token_score = rng.choice([0, 1, 2, 3, 8])
    if not heavy and rng.random() < 0.4:
        influence(rng, r.influence)
    return r


def examples(rng: random.Random, n: int) -> list[pb.LabeledText]:
    return [pb.LabeledText(text=rng.choice(TEXTS) if rng.random() < 0.8 else rstr(rng),
                           label=rng.choice([0, 1, 1, 0, -1, 2, INT32[1]])) for _ in range(n)]


def retrain(rng: random.Random, r: pb.RetrainOptions) -> None:
    r.enabled = rng.random() < 0.5
    r.mode = rng.choice([0, 1, 2, 9])
    if rng.random() < 0.5:
        r.epochs = rng.choice([0, 1, 11, -1])
    if rng.random() < 0.3:
        r.save_as = rstr(rng)
    if rng.random() < 0.2:
        r.eval_examples.extend(examples(rng, 2))


def attack_req(rng: random.Random) -> pb.AttackRequest:
    r = pb.AttackRequest(model=rng.choice(["tiny"] * 4 + [rstr(rng)]),
                         examples=examples(rng, rng.choice([0, 1, 2, 501])),
                         mode=rng.choice([0, 1, 2, 3, 4, 9]),
                         examples_per_test=rng.choice([0, 1, 2, 51, -1]),
                         seed=rng.choice([0, 2**64 - 1, rng.getrandbits(64)]))
    if rng.random() < 0.5:
        r.random_candidates = rng.choice([0, 1, 21, -1])
    if rng.random() < 0.3:
        influence(rng, r.influence)
    if rng.random() < 0.5:
        retrain(rng, r.retrain)
    if rng.random() < 0.5:
        r.request_id = rng.choice(["", "x" * 500, "fuzz-" + str(rng.randint(0, 20)), "a b"])
    return r


def repair_req(rng: random.Random) -> pb.RepairRequest:
    r = pb.RepairRequest(model=rng.choice(["tiny"] * 4 + [rstr(rng)]),
                         examples=examples(rng, rng.choice([0, 1, 3])),
                         examples_per_error=rng.choice([0, 1, 2, 51, -1]),
                         mode=rng.choice([0, 1, 2, 7]),
                         seed=rng.choice([0, 2**64 - 1]))
    if rng.random() < 0.3:
        influence(rng, r.influence)
    if rng.random() < 0.5:
        retrain(rng, r.retrain)
    if rng.random() < 0.5:
        r.request_id = rng.choice(["", "fuzz-r-" + str(rng.randint(0, 20)), "\x01"])
    return r


class Fuzzer:
    def __init__(self, address: str, seed: int) -> None:
        self.address = address
        self.seed = seed
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self.bad: list[str] = []
        self.names: list[str] = []  # operation names seen (for Get/Cancel/Delete/Wait)
        self.lock = threading.Lock()

    def record(self, rpc: str, code: str, detail: str = "") -> None:
        with self.lock:
            self.counts[rpc][code] += 1
            if code in FORBIDDEN and len(self.bad) < 50:
                self.bad.append(f"{rpc}: {code}: {detail[:300]}")

    def op_name(self, rng: random.Random) -> str:
        with self.lock:
            known = list(self.names[-50:])
        if known and rng.random() < 0.6:
            return rng.choice(known)
        return rstr(rng) if rng.random() < 0.5 else f"operations/attack-{rng.getrandbits(128):032x}"

    def one(self, rng: random.Random, ch: grpc.Channel) -> None:
        stub = pbg.PairdotsServiceStub(ch)
        ops: Any = operations_pb2_grpc.OperationsStub(ch)
        kind = rng.choices(
            ["ListModels", "GetModel", "Explain", "Attack", "Repair", "GetOperation",
             "ListOperations", "CancelOperation", "DeleteOperation", "WaitOperation", "Health",
             "Malformed", "Auth"],
            weights=[3, 6, 30, 10, 8, 8, 6, 5, 5, 4, 2, 8, 5])[0]
        md: list[tuple[str, str]] | None = None
        timeout = 20.0
        if kind == "ListModels":
            call, req = stub.ListModels, pb.ListModelsRequest()
        elif kind == "GetModel":
            call, req = stub.GetModel, pb.GetModelRequest(name=rng.choice(["tiny", rstr(rng)]))
        elif kind == "Explain":
            call, req = stub.Explain, explain_req(rng)
        elif kind == "Attack":
            call, req = stub.Attack, attack_req(rng)
        elif kind == "Repair":
            call, req = stub.Repair, repair_req(rng)
        elif kind == "GetOperation":
            call, req = ops.GetOperation, operations_pb2.GetOperationRequest(name=self.op_name(rng))
        elif kind == "ListOperations":
            req = operations_pb2.ListOperationsRequest(
                name=rng.choice(["", "operations", "x", rstr(rng)]),
                filter=rng.choice(["", "kind=attack", "state=RUNNING AND done=false", "done=maybe",
                                   "kind=attack AND kind=repair", "x" * 10_000, rstr(rng)]),
                page_size=rng.choice([0, 1, 500, 10**6, -1]),
                page_token=rng.choice(["", "", rstr(rng)]))
            call = ops.ListOperations
        elif kind == "CancelOperation":
            call = ops.CancelOperation
            req = operations_pb2.CancelOperationRequest(name=self.op_name(rng))
        elif kind == "DeleteOperation":
            call = ops.DeleteOperation
            req = operations_pb2.DeleteOperationRequest(name=self.op_name(rng))
        elif kind == "WaitOperation":
            req = operations_pb2.WaitOperationRequest(name=self.op_name(rng))
            if rng.random() < 0.7:
                req.timeout.CopyFrom(duration_pb2.Duration(
                    seconds=rng.choice([0, 0, 1, -5]), nanos=rng.choice([0, 100_000_000])))
            call = ops.WaitOperation
        elif kind == "Health":
            call = health_pb2_grpc.HealthStub(ch).Check
            req = health_pb2.HealthCheckRequest(service=rng.choice(["", "pairdots.v1.PairdotsService",
                                                                    "nope"]))
        elif kind == "Malformed":
            method = rng.choice(["/pairdots.v1.PairdotsService/Explain",
                                 "/pairdots.v1.PairdotsService/Attack",
                                 "/pairdots.v1.PairdotsService/GetModel",
                                 "/google.longrunning.Operations/GetOperation",
                                 "/google.longrunning.Operations/ListOperations"])
            call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            req = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
            kind = "Malformed" + method.rsplit("/", 1)[1]
        else:  # Auth: metadata on a server without auth (ignored) must not break anything
            call, req = stub.GetModel, pb.GetModelRequest(name="tiny")
            md = [("authorization", rng.choice(["Bearer x", "", "Basic y"]))] * rng.randint(1, 3)
        try:
            resp = call(req, timeout=timeout, metadata=md)
            code = "OK"
            if kind in ("Attack", "Repair"):
                with self.lock:
                    self.names.append(resp.name)
            self.record(kind, code)
        except grpc.RpcError as err:
            self.record(kind, err.code().name, err.details() or "")

    def run(self, n: int, threads: int) -> None:
        per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

        def worker(k: int) -> None:
            rng = random.Random(self.seed * 1000 + k)
            with grpc.insecure_channel(self.address) as ch:
                for _ in range(per[k]):
                    self.one(rng, ch)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/pairdots-bench-tiny")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fuzz.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    root = tiny_root(work / "bundles")
    db = work / f"fuzz-{int(time.time())}.sqlite3"
    server = Served(root, db, "--max-workers", "2", "--max-queue", "16")
    started = time.perf_counter()
    try:
        fz = Fuzzer(server.address, a.seed)
        fz.run(a.requests, a.threads)
        alive = server.alive()
    finally:
        server.stop()
    seconds = time.perf_counter() - started
    total: collections.Counter[str] = collections.Counter()
    for c in fz.counts.values():
        total.update(c)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "requests": sum(total.values()),
        "threads": a.threads,
        "seconds": round(seconds, 1),
        "server_alive_at_end": alive,
        "codes": dict(total.most_common()),
        "by_rpc": {rpc: dict(c.most_common()) for rpc, c in sorted(fz.counts.items())},
        "unknown_or_internal": sum(total[c] for c in FORBIDDEN),
        "forbidden_examples": fz.bad,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("requests", "seconds", "codes",
                                             "unknown_or_internal", "server_alive_at_end")}))
    return 0 if result["unknown_or_internal"] == 0 and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
