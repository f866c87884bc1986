"""Scale (issue 13): how the cost of Explain grows with the training set N.

For each N in --ns (default 7000,70000,700000), with ONE model for every N:

  model   once: a tiny random BertForSequenceClassification (pairdots_server.testing.
          build_tiny_model_dir: hidden 32, 2 layers, 2 heads; WordPiece vocabulary = the words
          of the real SST-2 training set + every ASCII character) fine-tuned by
          `pairdots prepare --scope head --no-index --low-rank 0 --no-ekfac --no-diagonal` on the
          real SST-2 training set (6,920 sentences, ../shared/data/sst2, read in place). No
          network, no model hub.
  data    N synthetic training texts: for a label drawn at random (balanced), a length drawn
          from the real training texts' lengths (in words) and that many words drawn from the
          label's unigram distribution over the real training set's words; a headerless
          ``text<TAB>label`` TSV under --work (outside the repository; seeded).
  bundle  `pairdots import --model <the fine-tuned model/> --train <synthetic TSV> --scope head
          --no-index --low-rank 24 --no-ekfac --no-diagonal` (θ identical for every N; the
          low-rank GGN factors are what the served default solver needs; EK-FAC / diagonal
          Fisher are full passes over N the default Explain does not use). Wall time and the
          child's peak RSS.
  index   the Helm chart's Indexed Job (deploy/helm/pairdots/templates/job-index-build.yaml,
          parallelism = completions = --shards): S processes started together, process i with
          JOB_COMPLETION_INDEX=i running the chart's command
            mkdir -p PARTS; pairdots index build --bundle=B --shard="$JOB_COMPLETION_INDEX"
              --num-shards=S --out=PARTS --grad-batch-size=32 --device=cpu --quiet
              --index-dim K; touch PARTS/.done-"$JOB_COMPLETION_INDEX"
          then, once every .done marker is there (the merge Job's initContainer),
          `pairdots index merge --bundle=B --parts=PARTS`. Recorded: the map's wall time, each
          shard's wall / CPU seconds and peak RSS, the merge's wall time. At N ≤
          --check-single-max a single-process `pairdots index build` runs first and the merged
          vectors are compared with its vectors (ids equal, max |Δ|).
          (`pairdots` = `python -m pairdots_server.cli` with server/ and client/ on PYTHONPATH.)
  recall  at N ≥ --ivf-min-n (default 100,000 = the server's AUTO_IVF_THRESHOLD, where kind
          "auto" switches from flat to IVF): the merged vectors in a flat FAISS index and in
          IVF indexes (index/faiss_index.FaissIndex, IndexIVFFlat; this code base has no PQ) for
          each nlist in {default_nlist(N)} ∪ --nlists and each nprobe in --nprobes ∪
          {default_nprobe(nlist), nlist} (nprobe = nlist: every list, exhaustive); queries =
          ±Pᵀs_test of the prediction margin (Explain's default measurement) of --recall-queries
          SST-2 test sentences not used below. recall@10 = |IVF top-10 ∩ flat top-10| / 10, and
          recall10@K = |IVF top-K ∩ flat top-10| / 10 at the served K; train + add seconds and
          search ms/query per setting. Chosen: the fastest setting with recall@10 ≥
          --recall-target (else the most accurate).
  serve   a fresh process (memory per replica) loads the bundle as the server does
          (ModelRuntime(load_bundle(...)), the runtime a server holds per bundle), loads the
          index (timed apart: the server does it lazily inside the first Explain, and an IVF
          index retrains its coarse quantizer on every load, index/store.py), installs the
          chosen IVF setting (nprobe through FaissIndex.set_nprobe; an nlist other than the
          default by replacing the runtime's index with FaissIndex(kind="ivf", nlist, nprobe)
          over the same vectors — the server has no nlist/nprobe setting: runtime.index() calls
          store.load_index with the defaults), then runs explain.explain (the served Explain):
            first   the first call ("i loved it !"): cold caches (low-rank factors, s_test);
            default --queries warm calls, the server defaults (K = clamp(2 % N, 50, 2000) per
                    direction, margin measurement over examples containing the word, low-rank
                    solver, exact Eq. 8 token influence, top 3 words, 5 examples each way);
            fixed_k --queries warm calls with K = --fixed-k at every N (what grows with N
                    besides K itself).
          The same query texts at every N (seeded SST-2 test sentences). Stages as
          bench/explain_latency.py (explain._Timer, summed over the explained words):
          saliency, grad_score, solve, candidates (projection + index search), exact_scoring
          (Eq. 5 on the candidates, incl. computing their h_L rows on first use), token_influence
          (Eq. 8); other = total - stages (the word index lookup, set(allowed), ...). p50 / p90
          per stage over the warm calls. RSS (VmRSS, peak VmHWM) after the imports, after the
          bundle load, after the index load and after the calls; the scope-input rows (h_L)
          the runtime computed and keeps. No scope_inputs.safetensors is built: at N = 700k it
          is N·T·D·4 bytes in every replica; rows are computed for the candidates on first use.

Index bytes: vectors.safetensors on disk (N·k·4 B vectors + N·8 B ids) and per example; a
loaded flat FAISS index holds another N·k·4 B copy, IVF-Flat the same plus nlist·k·4 B.

Threads: every process runs with torch.set_num_threads / OMP_NUM_THREADS / MKL_NUM_THREADS =
--threads (children inherit the caller's nice level). Load averages are recorded per stage.
Prints a table; writes bench/results/<--result>.json (default scale.json) with every figure.

    nice -n 10 python3 bench/scale.py --threads 1 --ns 7000,70000,700000 > scale.log 2>&1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "server"))

from _results import write_result

STAGES = ("saliency", "grad_score", "solve", "candidates", "exact_scoring", "token_influence")
FIRST_TEXT = "i loved it !"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
MODEL_SPEC: dict[str, Any] = {"hidden": 32, "layers": 2, "heads": 2, "max_positions": 128,
                              "seed": 0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rss_mb() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process in MB, from /proc/self/status."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def child_env(threads: int) -> dict[str, str]:
    """The environment of every child: threads pinned, server/ and client/ importable."""
    path = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"),
                            os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                PYTHONPATH=path, TOKENIZERS_PARALLELISM="false")


PAIRDOTS = [sys.executable, "-m", "pairdots_server.cli"]


@dataclass
class ChildRun:
    """A finished child process: exit code, wall / CPU seconds, peak RSS, its log file."""

    cmd: list[str]
    code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    log: Path

    def check(self) -> ChildRun:
        if self.code != 0:
            tail = self.log.read_text(errors="replace").splitlines()[-25:]
            raise SystemExit(f"{' '.join(self.cmd)} failed ({self.code}); {self.log}:\n"
                             + "\n".join(tail))
        return self

    def summary(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


def run_children(cmds: Sequence[list[str]], logs: Sequence[Path], threads: int,
                 envs: Sequence[dict[str, str]] | None = None) -> list[ChildRun]:
    """Start every command at once (output to its log), wait for all; wait4 gives each one's
    CPU time and peak RSS (ru_maxrss, including the descendants it waited for)."""
    base = child_env(threads)
    procs: dict[int, tuple[int, float]] = {}
    handles = []
    for i, (cmd, path) in enumerate(zip(cmds, logs, strict=True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("w")
        env = dict(base, **(envs[i] if envs else {}))
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        handles.append((p, fh))
        procs[p.pid] = (i, time.perf_counter())
    out: list[ChildRun | None] = [None] * len(cmds)
    while procs:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in procs:
            continue
        i, t0 = procs.pop(pid)
        out[i] = ChildRun(list(cmds[i]), os.waitstatus_to_exitcode(status),
                          time.perf_counter() - t0, usage.ru_utime + usage.ru_stime,
                          usage.ru_maxrss / 1024, logs[i])
    for p, fh in handles:
        p.returncode = 0  # reaped by wait4 above
        fh.close()
    return [r for r in out if r is not None]


def run_child(cmd: list[str], log_path: Path, threads: int) -> ChildRun:
    return run_children([cmd], [log_path], threads)[0].check()


# -- data --------------------------------------------------------------------------------------


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """SST-2 rows (text, label) of a headerless TSV, read in place."""
    from pairdots_server.storage.data import read_examples

    return [(e.text, e.label) for e in read_examples(path)]


def synthesize(n: int, seed: int, out: Path) -> dict[str, Any]:
    """Write n synthetic (text, label) rows to `out` (see the module docstring)."""
    import numpy as np

    real = read_tsv(SST2 / "train.tsv")
    lengths = np.array([len(t.split()) for t, _ in real])
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    lens = rng.choice(lengths, size=n)
    vocab: dict[int, list[str]] = {}
    draws: dict[int, list[int]] = {}
    for y in (0, 1):
        counts = Counter(w for t, lab in real if lab == y for w in t.split())
        vocab[y] = sorted(counts)
        p = np.array([counts[w] for w in vocab[y]], dtype=np.float64)
        draws[y] = rng.choice(len(vocab[y]), size=int(lens[labels == y].sum()),
                              p=p / p.sum()).tolist()
    pos = {0: 0, 1: 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for y, m in zip(labels.tolist(), lens.tolist(), strict=True):
            words = vocab[y]
            fh.write(" ".join(words[j] for j in draws[y][pos[y] : pos[y] + m]) + f"\t{y}\n")
            pos[y] += m
    return {"count": n, "seed": seed, "mean_words": float(lens.mean()),
            "bytes": out.stat().st_size, "source": str(SST2 / "train.tsv")}


def base_model(work: Path, threads: int, epochs: int) -> tuple[Path, dict[str, Any]]:
    """The one fine-tuned model every N imports (cached under work/)."""
    bundle = work / "bundles" / "scale-base"
    if (bundle / "manifest.json").is_file():
        return bundle / "model", json.loads((bundle / "manifest.json").read_text())
    from pairdots_server.testing import build_tiny_model_dir, words_of

    vocab = words_of(t for t, _ in read_tsv(SST2 / "train.tsv"))
    raw = build_tiny_model_dir(work / "model-random", vocab, num_labels=2,
                               seed=MODEL_SPEC["seed"], hidden=MODEL_SPEC["hidden"],
                               layers=MODEL_SPEC["layers"], heads=MODEL_SPEC["heads"],
                               max_positions=MODEL_SPEC["max_positions"])
    cmd = PAIRDOTS + ["prepare", "--model", str(raw), "--train", str(SST2 / "train.tsv"),
                      "--dev", str(SST2 / "dev.tsv"), "--labels", "negative,positive",
                      "--name", "scale-base", "--out", str(work / "bundles"), "--scope", "head",
                      "--no-index", "--low-rank", "0", "--no-ekfac", "--no-diagonal",
                      "--epochs", str(epochs), "--lr", "3e-3", "--batch-size", "32",
                      "--max-length", "64", "--overwrite", "--quiet"]
    run_child(cmd, work / "logs" / "prepare-base.log", threads)
    return bundle / "model", json.loads((bundle / "manifest.json").read_text())


# -- per-N stages --------------------------------------------------------------------------


def import_bundle(model: Path, train: Path, name: str, work: Path, threads: int,
                  low_rank: int) -> tuple[Path, dict[str, Any]]:
    cmd = PAIRDOTS + ["import", "--model", str(model), "--train", str(train),
                      "--dev", str(SST2 / "dev.tsv"), "--labels", "negative,positive",
                      "--name", name, "--out", str(work / "bundles"), "--max-length", "64",
                      "--scope", "head", "--no-index", "--low-rank", str(low_rank),
                      "--no-ekfac", "--no-diagonal", "--overwrite", "--quiet"]
    la = loadavg()
    r = run_child(cmd, work / "logs" / f"import-{name}.log", threads)
    bundle = work / "bundles" / name
    manifest = json.loads((bundle / "manifest.json").read_text())
    return bundle, {**r.summary(), "loadavg_start": la, "loadavg_end": loadavg(),
                    "command": " ".join(cmd[2:]),
                    "lowrank_seconds": (manifest.get("curvature") or {}).get("lowrank", {})
                    .get("seconds"),
                    "train_jsonl_bytes": (bundle / "train.jsonl").stat().st_size}


def index_flags(args: argparse.Namespace) -> list[str]:
    return ["--grad-batch-size=32", "--device=cpu", "--quiet", f"--index-dim={args.index_dim}"]


def single_build(bundle: Path, name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One-process `pairdots index build` (writes the bundle's index/); its vectors."""
    from pairdots_server.index.store import load_index_data

    cmd = PAIRDOTS + ["index", "build", f"--bundle={bundle}", *index_flags(args)]
    r = run_child(cmd, work / "logs" / f"index-single-{name}.log", args.threads)
    ids, vectors, _ = load_index_data(bundle / "index")
    return {"run": r.summary(), "ids": ids, "vectors": vectors}


def sharded_build(bundle: Path, name: str, work: Path, args: argparse.Namespace
                  ) -> dict[str, Any]:
    """The chart's Indexed Job (S processes at once) + the merge Job."""
    parts = work / "parts" / f"{name}-n{args.shards}"
    shutil.rmtree(parts, ignore_errors=True)
    script = (f'mkdir -p "{parts}"\n'
              + " ".join(PAIRDOTS) + f' index build --bundle="{bundle}" '
              f'--shard="$JOB_COMPLETION_INDEX" --num-shards={args.shards} --out="{parts}" '
              + " ".join(index_flags(args)) + "\n"
              f'touch "{parts}/.done-$JOB_COMPLETION_INDEX"\n')
    cmds = [["/bin/sh", "-ec", script] for _ in range(args.shards)]
    envs = [{"JOB_COMPLETION_INDEX": str(i)} for i in range(args.shards)]
    logs = [work / "logs" / f"index-shard-{name}-{i}.log" for i in range(args.shards)]
    la = loadavg()
    t0 = time.perf_counter()
    runs = [r.check() for r in run_children(cmds, logs, args.threads, envs)]
    map_wall = time.perf_counter() - t0
    done = len(list(parts.glob(".done-*")))
    if done != args.shards:
        raise SystemExit(f"{parts}: {done} of {args.shards} .done markers")
    merge_cmd = PAIRDOTS + ["index", "merge", f"--bundle={bundle}", f"--parts={parts}"]
    merge = run_child(merge_cmd, work / "logs" / f"index-merge-{name}.log", args.threads)
    part_bytes = sum(p.stat().st_size for p in parts.glob("part-*"))
    shutil.rmtree(parts, ignore_errors=True)
    return {
        "shards": args.shards, "parallelism": args.shards, "map_wall_s": round(map_wall, 2),
        "per_shard": [r.summary() for r in runs],
        "merge": merge.summary(),
        "total_wall_s": round(map_wall + merge.wall_s, 2),
        "parts_bytes": part_bytes, "loadavg_start": la, "loadavg_end": loadavg(),
        "shard_command": script.splitlines()[1],
        "merge_command": " ".join(merge_cmd[2:]),
    }


def index_bytes(bundle: Path) -> dict[str, Any]:
    meta = json.loads((bundle / "index" / "meta.json").read_text())
    n, k = int(meta["count"]), int(meta["out_dim"])
    size = (bundle / "index" / "vectors.safetensors").stat().st_size
    return {"vectors_file_bytes": size, "bytes_per_example_file": round(size / n, 2),
            "dim": k, "vector_bytes_per_example": 4 * k, "id_bytes_per_example": 8,
            "projection": meta.get("projection_kind"), "kind_in_meta": meta.get("kind")}


# -- child: recall of IVF against flat ---------------------------------------------------------


def query_texts(n: int, seed: int, skip: int = 0) -> list[str]:
    """n SST-2 test sentences (seeded order), after the first `skip` of that order."""
    rows = read_tsv(SST2 / "test.tsv")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i][0] for i in order[skip : skip + n]]


def margin_queries(rt: Any, projection: Any, texts: Sequence[str]) -> Any:
    """±Pᵀ s_test of the prediction margin (Explain's default measurement) -> [2Q, k]."""
    import numpy as np
    from _common import default_candidates, no_stop

    from pairdots_server.influence import pipeline as steps
    from pairdots_server.influence.settings import InfluenceSettings

    settings = InfluenceSettings().resolve(rt, default_candidates=default_candidates(rt.n_train))
    out = []
    for text in texts:
        enc = steps.encode_text(rt, text)
        label = int(steps.predict(rt, enc).argmax())
        m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
        s, _ = steps.measurement_s_test(rt, enc, m, settings, no_stop)
        q = projection.project(s[None].float()).cpu().numpy()[0]
        out.extend([-q, q])  # supporting and opposing directions, as pipeline.candidates
    return np.asarray(out, dtype=np.float32)


def recall_child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from _common import default_candidates, load_runtime

    from pairdots_server.index.faiss_index import FaissIndex, default_nlist, default_nprobe
    from pairdots_server.index.store import load_index_data

    torch.set_num_threads(args.threads)
    rt, _ = load_runtime(args.bundle, args.threads)
    ids, vectors, meta = load_index_data(Path(args.bundle) / "index")
    n = len(ids)
    k_served = default_candidates(n)
    from pairdots_server.influence.runtime import PROJECTION_CACHE_BYTES

    projection = meta.projection(max_dense_bytes=PROJECTION_CACHE_BYTES)
    qs = margin_queries(rt, projection,
                        query_texts(args.recall_queries, args.seed, skip=args.query_pool))
    flat = FaissIndex(meta.out_dim, kind="flat", use_gpu=False)
    flat.add(vectors, ids)
    t0 = time.perf_counter()
    _, exact = flat.search(qs, 10)
    flat_ms = (time.perf_counter() - t0) / len(qs) * 1e3
    t0 = time.perf_counter()
    flat.search(qs, k_served)
    flat_k_ms = (time.perf_counter() - t0) / len(qs) * 1e3
    del flat
    nl0 = default_nlist(n)
    nlists = sorted({nl0, *[x for x in args.nlists if 1 <= x <= n // 39]})
    rows: list[dict[str, Any]] = []
    for nlist in nlists:
        ivf = FaissIndex(meta.out_dim, kind="ivf", nlist=nlist, use_gpu=False)
        t0 = time.perf_counter()
        ivf.add(vectors, ids)
        build_s = time.perf_counter() - t0
        probes = sorted({p for p in [*args.nprobes, default_nprobe(nlist), nlist]
                         if p <= nlist})
        for nprobe in probes:
            ivf.set_nprobe(nprobe)
            t0 = time.perf_counter()
            _, got10 = ivf.search(qs, 10)
            ms10 = (time.perf_counter() - t0) / len(qs) * 1e3
            t0 = time.perf_counter()
            _, got_k = ivf.search(qs, k_served)
            ms_k = (time.perf_counter() - t0) / len(qs) * 1e3
            r10 = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got10, exact)]
            rk = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got_k, exact)]
            rows.append({
                "nlist": nlist, "nprobe": nprobe, "default": nlist == nl0
                and nprobe == default_nprobe(nlist), "train_add_s": round(build_s, 2),
                "recall_at_10": float(np.mean(r10)), "recall_at_10_min": float(np.min(r10)),
                "recall10_at_K": float(np.mean(rk)), "search_ms_top10": round(ms10, 3),
                "search_ms_topK": round(ms_k, 3),
            })
            log(f"  recall nlist={nlist} nprobe={nprobe}: recall@10 {rows[-1]['recall_at_10']:.3f}"
                f" (min {rows[-1]['recall_at_10_min']:.1f}), 10@K {rows[-1]['recall10_at_K']:.3f},"
                f" top-K search {ms_k:.1f} ms (flat {flat_k_ms:.1f} ms), train+add {build_s:.1f}s")
        del ivf
    ok = [r for r in rows if r["recall_at_10"] >= args.recall_target]
    chosen = (min(ok, key=lambda r: (r["search_ms_topK"], -r["recall_at_10"])) if ok
              else max(rows, key=lambda r: (r["recall_at_10"], -r["search_ms_topK"])))
    return {"n": n, "dim": meta.out_dim, "queries": len(qs), "K": k_served,
            "flat_search_ms_top10": round(flat_ms, 3), "flat_search_ms_topK": round(flat_k_ms, 3),
            "default_nlist": nl0, "default_nprobe": default_nprobe(nl0),
            "target": args.recall_target, "grid": rows,
            "chosen": {"nlist": chosen["nlist"], "nprobe": chosen["nprobe"],
                       "recall_at_10": chosen["recall_at_10"],
                       "meets_target": bool(ok)}}


# -- child: the served Explain ---------------------------------------------------------------


def explain_call(rt: Any, text: str, k: int, candidates: int) -> dict[str, Any]:
    """One explain.explain call -> stage seconds, total, other and what it scored."""
    from _common import no_stop

    from pairdots_server.influence import words as words_
    from pairdots_server.influence.explain import ExplainQuery, explain
    from pairdots_server.influence.settings import InfluenceSettings

    q = ExplainQuery(text=text, influence=InfluenceSettings(candidates=candidates))
    ans = explain(rt, q, no_stop, default_candidates=k)
    row: dict[str, Any] = {s: float(ans.timings.get(s, 0.0)) for s in STAGES}
    row["total"] = ans.total_seconds
    row["other"] = ans.total_seconds - sum(row[s] for s in STAGES)
    row["candidates_scored"] = ans.candidates_scored
    kk = candidates or k
    words = []
    for sw in ans.explanations[0].salient_words:
        c = sw.containing_examples
        path = ("all_containing" if 0 < c <= 2 * kk else
                "index_deep" if c else "index")
        deep = math.ceil(kk * rt.n_train / c) if path == "index_deep" else kk
        t0 = time.perf_counter()  # what pipeline.candidates does with `allowed` first
        _ = set(words_.examples_containing(rt, sw.text))
        set_s = time.perf_counter() - t0
        words.append({"word": sw.text, "containing": c, "path": path, "set_allowed_s": set_s,
                      "search_k": min(deep, rt.n_train) if path != "all_containing" else 0,
                      "solver": sw.solver.get("method"), "cached": bool(sw.solver.get("cached"))})
    row["words"] = words
    return row


def stage_stats(calls: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for s in (*STAGES, "other", "total"):
        xs = sorted(c[s] for c in calls)
        out[s] = {"p50": statistics.median(xs),
                  "p90": xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))],
                  "mean": statistics.fmean(xs)}
    return out


def serve_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from _common import default_candidates, load_runtime

    from pairdots_server.index.faiss_index import FaissIndex
    from pairdots_server.index.store import load_index_data

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rss_imports = rss_mb()
    rt, load_s = load_runtime(args.bundle, args.threads)
    rss_load = rss_mb()
    k = default_candidates(rt.n_train)
    t0 = time.perf_counter()
    index, _ = rt.index()
    index_load_s = time.perf_counter() - t0
    served = dict(index.describe())
    override = None
    if args.nlist:
        if served.get("kind") != "ivf" or args.nlist != served.get("nlist"):
            ids, vectors, meta = load_index_data(Path(args.bundle) / "index")
            t0 = time.perf_counter()
            new = FaissIndex(meta.out_dim, kind="ivf", nlist=args.nlist, nprobe=args.nprobe,
                             use_gpu=False)
            new.add(vectors, ids)
            del ids, vectors
            rt._index = new  # the server has no nlist setting (see the module docstring)
            override = {"replaced_runtime_index": True, "build_s": time.perf_counter() - t0}
        else:
            assert isinstance(index, FaissIndex)
            index.set_nprobe(args.nprobe)
            override = {"replaced_runtime_index": False, "set_nprobe": args.nprobe}
        served = dict(rt.index()[0].describe())
    rss_index = rss_mb()
    texts = query_texts(2 * args.queries, args.seed)
    log(f"  serve N={rt.n_train}: loaded in {load_s:.1f}s, index {index_load_s:.1f}s "
        f"({served.get('kind')}), K={k}, RSS {rss_index.get('VmRSS')} MB")
    first = explain_call(rt, FIRST_TEXT, k, 0)
    log(f"  first: {first['total']:.2f}s " + " ".join(f"{s}={first[s]:.2f}" for s in STAGES))
    configs: dict[str, Any] = {}
    for ci, (name, cand) in enumerate((("default", 0), ("fixed_k", args.fixed_k))):
        calls = []
        for text in texts[ci * args.queries : (ci + 1) * args.queries]:
            calls.append(explain_call(rt, text, k, cand))
            c = calls[-1]
            log(f"  [{name}] {c['total']:.2f}s " + " ".join(f"{s}={c[s]:.3f}" for s in STAGES)
                + f" other={c['other']:.3f} scored {c['candidates_scored']} | "
                + ", ".join(f"{w['word']}:{w['containing']}/{w['path']}" for w in c["words"]))
        configs[name] = {"K": cand or k, "calls": calls, "warm": stage_stats(calls)}
    rss_end = rss_mb()
    cache = rt.scope_inputs()
    return {
        "n_train": rt.n_train, "scope_parameters": rt.num_params, "K_default": k,
        "load_s": load_s, "index_load_s": index_load_s, "index": served,
        "index_override": override, "first": first, "configs": configs,
        "first_incl_index_load_s": index_load_s + first["total"],
        "rss_mb": {"after_imports": rss_imports, "after_load": rss_load,
                   "after_index": rss_index, "after_calls": rss_end},
        "scope_inputs": None if cache is None else {
            "rows": len(cache), "computed": cache.computed, "loaded": cache.loaded,
            "bytes": cache.nbytes},
        "threads": args.threads, "loadavg_end": loadavg(),
    }


def run_py_child(mode: str, bundle: Path, extra: list[str], log_path: Path,
                 args: argparse.Namespace) -> tuple[dict[str, Any], ChildRun]:
    out = log_path.with_suffix(".json")
    cmd = [sys.executable, str(HERE / "scale.py"), "--child", mode, "--bundle", str(bundle),
           "--child-out", str(out), "--threads", str(args.threads), "--seed", str(args.seed),
           "--queries", str(args.queries), "--fixed-k", str(args.fixed_k),
           "--recall-queries", str(args.recall_queries), "--recall-target",
           str(args.recall_target), "--nlists", ",".join(map(str, args.nlists)) or "0",
           "--nprobes", ",".join(map(str, args.nprobes)), *extra]
    r = run_child(cmd, log_path, args.threads)
    return json.loads(out.read_text()), r


# -- the driver --------------------------------------------------------------------------------


@dataclass
class NResult:
    n: int
    data: dict[str, Any] = field(default_factory=dict)
    bundle: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    single_check: dict[str, Any] | None = None
    recall: dict[str, Any] | None = None
    serve: dict[str, Any] = field(default_factory=dict)
    index_bytes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run_n(n: int, model: Path, args: argparse.Namespace) -> NResult:
    import numpy as np

    from pairdots_server.index.store import load_index_data

    t_n = time.perf_counter()
    res = NResult(n)
    name = f"scale-{n}"
    work: Path = args.work
    tsv = work / "data" / f"train-{n}.tsv"
    t0 = time.perf_counter()
    res.data = {**synthesize(n, args.seed + n, tsv), "seconds": round(time.perf_counter() - t0, 2)}
    log(f"N={n}: synthetic data {res.data['seconds']:.1f}s")
    bundle, res.bundle = import_bundle(model, tsv, name, work, args.threads, args.low_rank)
    log(f"N={n}: import {res.bundle['wall_s']:.1f}s, peak RSS {res.bundle['peak_rss_mb']:.0f} MB")
    single = None
    if n <= args.check_single_max:
        single = single_build(bundle, name, work, args)
        log(f"N={n}: single-process index build {single['run']['wall_s']:.1f}s")
    res.index = sharded_build(bundle, name, work, args)
    log(f"N={n}: sharded index build map {res.index['map_wall_s']:.1f}s + merge "
        f"{res.index['merge']['wall_s']:.1f}s; shards "
        + ", ".join(f"{s['wall_s']:.0f}s" for s in res.index["per_shard"]))
    if single is not None:
        ids, vectors, _ = load_index_data(bundle / "index")
        same_ids = bool(np.array_equal(ids, single["ids"]))
        diff = float(np.abs(vectors - single["vectors"]).max()) if same_ids else float("nan")
        scale = float(np.abs(single["vectors"]).max())
        res.single_check = {
            "single_build": single["run"], "ids_equal": same_ids,
            "vectors_bitwise_equal": bool(same_ids and np.array_equal(vectors, single["vectors"])),
            "max_abs_diff": diff, "max_abs_value": scale,
            "allclose_rtol1e-5_atol1e-6": bool(same_ids and np.allclose(
                vectors, single["vectors"], rtol=1e-5, atol=1e-6)),
        }
        log(f"N={n}: merged == single-process: {res.single_check}")
    res.index_bytes = index_bytes(bundle)
    extra: list[str] = []
    if n >= args.ivf_min_n:
        res.recall, _ = run_py_child("recall", bundle, [], work / "logs" / f"recall-{name}.log",
                                     args)
        ch = res.recall["chosen"]
        extra = ["--nlist", str(ch["nlist"]), "--nprobe", str(ch["nprobe"])]
        log(f"N={n}: chosen IVF nlist={ch['nlist']} nprobe={ch['nprobe']} "
            f"(recall@10 {ch['recall_at_10']:.3f})")
    res.serve, run = run_py_child("serve", bundle, extra, work / "logs" / f"serve-{name}.log",
                                  args)
    res.serve["process"] = run.summary()
    res.seconds = round(time.perf_counter() - t_n, 1)
    if not args.keep:
        shutil.rmtree(bundle, ignore_errors=True)
        tsv.unlink(missing_ok=True)
    return res


def summary_row(r: NResult) -> dict[str, Any]:
    """The figures of one N that the table shows."""
    s = r.serve
    idx = s["index"]
    warm = s["configs"]["default"]["warm"]
    return {
        "n": r.n, "import_s": r.bundle["wall_s"], "index_map_s": r.index["map_wall_s"],
        "index_merge_s": r.index["merge"]["wall_s"],
        "shard_wall_s": [x["wall_s"] for x in r.index["per_shard"]],
        "index_kind": idx.get("kind"), "nlist": idx.get("nlist"), "nprobe": idx.get("nprobe"),
        "recall_at_10": None if r.recall is None else r.recall["chosen"]["recall_at_10"],
        "index_bytes_per_example": r.index_bytes["bytes_per_example_file"],
        "K": s["K_default"], "load_s": s["load_s"], "index_load_s": s["index_load_s"],
        "first_s": s["first"]["total"],
        "p50": {st: warm[st]["p50"] for st in (*STAGES, "other", "total")},
        "p50_fixed_k_total": s["configs"]["fixed_k"]["warm"]["total"]["p50"],
        "rss_mb_after_index": s["rss_mb"]["after_index"].get("VmRSS"),
        "rss_mb_after_calls": s["rss_mb"]["after_calls"].get("VmRSS"),
    }


TABLE_LEGEND = (
    "import/map/merge: wall s of `pairdots import`, the parallel shard builds, the merge; "
    "index kind nlist/nprobe as served; rec@10: IVF recall@10 vs flat; B/ex: index file bytes "
    "per example; K: default candidates per direction; load/iload: bundle / index load s; "
    "first: the first Explain s (index already loaded); p50 and stages: warm default calls, s; "
    "p50 K0: warm calls at the fixed K; RSS idx / end: MB after the index load / the calls"
)


def table(results: Sequence[NResult]) -> list[str]:
    lines = [
        TABLE_LEGEND,
        f"{'N':>7} {'import':>6} {'map':>6} {'merge':>5} {'index':>12} {'rec@10':>6} "
        f"{'B/ex':>5} {'K':>5} {'load':>5} {'iload':>5} {'first':>5} {'p50':>6} "
        + " ".join(f"{st[:8]:>8}" for st in (*STAGES, "other"))
        + f" {'p50 K0':>6} {'RSS idx':>7} {'RSS end':>7}"
    ]
    for r in results:
        x = summary_row(r)
        kind = str(x["index_kind"])
        if kind == "ivf":
            kind += f" {x['nlist']}/{x['nprobe']}"
        rec = "" if x["recall_at_10"] is None else f"{x['recall_at_10']:.3f}"
        lines.append(
            f"{r.n:>7} {x['import_s']:6.1f} {x['index_map_s']:6.1f} {x['index_merge_s']:5.1f} "
            f"{kind:>12} {rec:>6} {x['index_bytes_per_example']:5.0f} {x['K']:>5} "
            f"{x['load_s']:5.1f} {x['index_load_s']:5.1f} {x['first_s']:5.2f} "
            f"{x['p50']['total']:6.3f} "
            + " ".join(f"{x['p50'][st]:8.3f}" for st in (*STAGES, "other"))
            + f" {x['p50_fixed_k_total']:6.3f} {x['rss_mb_after_index'] or 0:7.0f}"
            f" {x['rss_mb_after_calls'] or 0:7.0f}")
    return lines


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() and int(x) > 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=ints, default=[7000, 70000, 700000], help="comma-separated N")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/pairdots-scale"),
                    help="data, bundles, parts and logs (outside the repository)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shards", type=int, default=4, help="Indexed Job completions = parallelism")
    ap.add_argument("--index-dim", type=int, default=64, help="projection dimension k")
    ap.add_argument("--low-rank", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of the one model")
    ap.add_argument("--queries", type=int, default=8, help="warm Explain calls per config")
    ap.add_argument("--fixed-k", type=int, default=140, help="K of the fixed_k config")
    ap.add_argument("--check-single-max", type=int, default=10000,
                    help="compare with a single-process build at N up to this")
    ap.add_argument("--ivf-min-n", type=int, default=100_000)
    ap.add_argument("--nlists", type=ints, default=[64, 256, 1024],
                    help="nlist values tried besides default_nlist(N)")
    ap.add_argument("--nprobes", type=ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--recall-queries", type=int, default=20)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--query-pool", type=int, default=200,
                    help="recall queries are taken after this many of the seeded test order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the bundles and data")
    ap.add_argument("--result", default="scale", help="bench/results/<name>.json")
    ap.add_argument("--note", default="", help="a note stored in the JSON (e.g. why N shrank)")
    # internal: the child processes
    ap.add_argument("--child", choices=["serve", "recall"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nlist", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--nprobe", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        fn = serve_child if args.child == "serve" else recall_child
        args.child_out.write_text(json.dumps(fn(args), default=float) + "\n")
        return

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    la0 = loadavg()
    t0 = time.perf_counter()
    model, base_manifest = base_model(args.work, args.threads, args.epochs)
    base_s = time.perf_counter() - t0
    log(f"model: {model} (dev accuracy {(base_manifest.get('dev') or {}).get('accuracy')})")
    results: list[NResult] = []
    for n in args.ns:
        results.append(run_n(n, model, args))
        for line in table(results):
            log(line)
    lines = table(results)
    print("\n".join(lines), flush=True)

    def p50(r: NResult, cfg: str = "default") -> float:
        return float(r.serve["configs"][cfg]["warm"]["total"]["p50"])

    ratio = {}
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        ratio = {"small_n": lo.n, "large_n": hi.n,
                 "p50_ratio_default": p50(hi) / p50(lo),
                 "p50_ratio_fixed_k": p50(hi, "fixed_k") / p50(lo, "fixed_k"),
                 "target": 1.5}
        ratio["within_1_5x_default"] = ratio["p50_ratio_default"] <= 1.5
        ratio["within_1_5x_fixed_k"] = ratio["p50_ratio_fixed_k"] <= 1.5
        log(f"p50 total N={hi.n} / N={lo.n}: default {ratio['p50_ratio_default']:.2f}x, "
            f"fixed K={args.fixed_k} {ratio['p50_ratio_fixed_k']:.2f}x (target ≤ 1.5x)")
    payload = {
        "bench": "scale",
        "note": args.note,
        "model": {
            "kind": "BertForSequenceClassification (pairdots_server.testing."
                    "build_tiny_model_dir)", **MODEL_SPEC,
            "vocab": "SST-2 train words + ASCII characters",
            "num_parameters": (base_manifest.get("model") or {}).get("num_parameters"),
            "fine_tuned_on": "real SST-2 train (6,920), `pairdots prepare`",
            "epochs": args.epochs, "dev_accuracy": (base_manifest.get("dev") or {})
            .get("accuracy"), "base_seconds": round(base_s, 1),
        },
        "scope": {"kind": "head", "description": base_manifest.get("scope_description"),
                  "parameters": base_manifest.get("scope_num_parameters")},
        "data": "synthetic: per-label unigram samples of the SST-2 training words, real length "
                "distribution",
        "index_dim": args.index_dim, "projection": "sparse_sign (default)",
        "shards": args.shards, "threads": args.threads, "fixed_k": args.fixed_k,
        "queries_per_config": args.queries, "recall_target": args.recall_target,
        "loadavg_start": la0, "loadavg_end": loadavg(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "ratio": ratio,
        "table": lines,
        "rows": [summary_row(r) for r in results],
        "per_n": [{"n": r.n, "seconds": r.seconds, "data": r.data, "bundle": r.bundle,
                   "index_build": r.index, "single_process_check": r.single_check,
                   "index_bytes": r.index_bytes, "recall": r.recall, "serve": r.serve}
                  for r in results],
    }
    out = write_result(args.result, payload)
    log(f"-> {out}")
    print(json.dumps(payload, default=float), flush=True)


if __name__ == "__main__":
    main()
