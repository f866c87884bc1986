"""Shared helpers for bench/attack.py and bench/repair.py (not a benchmark itself)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings
from pairdots_server.model.retrain import RetrainMode, RetrainSpec, retrain
from pairdots_server.model.train import evaluate
from pairdots_server.perturb.objectives import Edit
from pairdots_server.storage.data import Example

SST2 = Path("/work/shared/data/sst2")


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=Path("bundles/minilm-sst2"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--full", action="store_true",
                   help="retrain every parameter from the base checkpoint (default: scope only)")
    p.add_argument("--proximal", action="store_true",
                   help="retrain the scope to the proximal Bregman response (deterministic; "
                        "what the damped influence function estimates; model/converged.py)")
    p.add_argument("--epochs", type=int, default=None, help="retrain epochs (default: recipe)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on retrain steps")
    p.add_argument("--solver", choices=["default", "lissa", "cg", "low_rank"], default="default")
    p.add_argument("--max-iterations", type=int, default=None, help="solver iterations")
    p.add_argument("--exhaustive", action="store_true",
                   help="score every training example exactly (default: the bundle's index)")
    p.add_argument("--candidates", type=int, default=200,
                   help="index candidates per direction scored exactly")
    p.add_argument("--random-candidates", type=int, default=5, help="T (paper: 5)")
    p.add_argument("--max-words", type=int, default=1, help="m: words substituted per example")
    p.add_argument("--edits-out", type=Path, default=None,
                   help="write the searched edits as JSON (bench/retrain_edits.py replays them)")
    p.add_argument("--search-only", action="store_true",
                   help="stop after the search (with --edits-out: retrain elsewhere)")
    p.add_argument("--seeds", default="0",
                   help="retrain seeds (batch order, dropout); each gets its own n = 0 row "
                        "and its own random baseline; the influence search is seeded by "
                        "--seed")
    p.add_argument("--seed-ns", default=None,
                   help="n values retrained for the seeds after the first (default: --ns)")
    p.add_argument("--cache", type=Path, default=Path("/var/tmp/pairdots-attack"),
                   help="the searches' edits are kept here and reused when the arguments match")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the result JSON and retrain only the others")


def influence_settings(a: argparse.Namespace) -> InfluenceSettings:
    method = None if a.solver == "default" else SolverChoice(a.solver)
    return InfluenceSettings(
        solver=SolverSettings(method=method, max_iterations=a.max_iterations),
        use_index=False if a.exhaustive else None, candidates=a.candidates,
    )


def retrain_spec(a: argparse.Namespace, seed: int | None = None) -> RetrainSpec:
    mode = RetrainMode.FULL if a.full else \
        RetrainMode.SCOPE_PROXIMAL if a.proximal else RetrainMode.SCOPE_ONLY
    return RetrainSpec(mode, epochs=a.epochs, max_steps=a.max_steps, seed=seed)


def seeds_and_ns(a: argparse.Namespace, ns: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(retrain seed, the n values retrained with it) from --seeds and --seed-ns."""
    seeds = [int(x) for x in a.seeds.split(",")]
    later = ns if a.seed_ns is None else sorted({int(x) for x in a.seed_ns.split(",")} | {0})
    return [(s, list(ns) if k == 0 else list(later)) for k, s in enumerate(seeds)]


def seed_free_row(
    a: argparse.Namespace, rows: Sequence[dict[str, Any]], seed: int, first_seed: int, mode: str,
    n: int,
) -> dict[str, Any] | None:
    """With --proximal the retrain does not depend on the seed (model/converged.py), and the
    influence searches are seeded by --seed: a later seed's n = 0 and influence rows are the
    first seed's, copied (marked "same_as_seed") instead of retrained; None otherwise (and
    for RANDOM, whose draw is per seed)."""
    if not getattr(a, "proximal", False) or seed == first_seed or mode == "random":
        return None
    for r in rows:
        if (r["seed"], r["mode"], r["n"]) == (first_seed, mode, n):
            return {**r, "seed": seed, "same_as_seed": first_seed}
    return None


def cached_search(path: Path, key: dict[str, Any], run: Any) -> dict[str, Any]:
    """run() -> a JSON-able dict, kept in `path` with `key`; reused when the key matches (a
    stopped benchmark resumes without searching again)."""
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            log(f"search reused from {path}")
            return d["value"]
    value = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}))
    return value


def edits_to_json(edits: Sequence[Edit]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(e) for e in edits]


def edits_from_json(rows: Sequence[dict[str, Any]]) -> list[Edit]:
    return [Edit(**{**r, "substitutions": tuple(tuple(x) for x in r["substitutions"])})
            for r in rows]


def bootstrap_ci(values: Sequence[float], seed: int = 0,
                 reps: int = 2000) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of `values` (resampled with
    replacement, `reps` times)."""
    import torch

    if not values:
        return (float("nan"), float("nan"))
    x = torch.tensor(list(values), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (reps, len(x)), generator=gen)].mean(dim=1).sort().values
    return (float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1]))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 pairs or a
    constant side."""
    if len(a) < 3:
        return float("nan")

    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def first_n_per_example(edits: Sequence[Edit], n: int) -> list[Edit]:
    """The first n edits of every request example (the n-prefix of the n_max search)."""
    counts: dict[int, int] = {}
    out = []
    for e in edits:
        if counts.get(e.example_index, 0) < n:
            counts[e.example_index] = counts.get(e.example_index, 0) + 1
            out.append(e)
    return out


def write_edits(
    path: Path, kind: str, rt: ModelRuntime, spec: RetrainSpec, ns: Sequence[int],
    evals: dict[str, Sequence[Example]], edits: dict[str, Sequence[Edit]], **extra: Any,
) -> None:
    """The search's result, replayable by bench/retrain_edits.py: {"kind", "bundle", "recipe",
    "base_model", "ns", "evals": {name: [[text, label], ...]}, "edits": {mode: [Edit, ...]},
    **extra}."""
    from pairdots_server.model.retrain import recipe

    payload = {
        "kind": kind, "bundle": rt.name, "recipe": recipe(rt, spec).to_dict(),
        "base_model": (rt.bundle.manifest.get("model") or {}).get("source"), "ns": list(ns),
        "evals": {k: [[e.text, e.label] for e in v] for k, v in evals.items()},
        "edits": {m: [dataclasses.asdict(e) for e in es] for m, es in edits.items()}, **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    log(f"edits written to {path}")


def edit_sets(
    kind: str, train: Sequence[Example], edits: dict[str, Sequence[Edit]], ns: Sequence[int],
) -> Iterator[tuple[str, int, int, list[Example]]]:
    """(mode, n, edits used, training set) for every table row: n = 0 first (the unperturbed
    set), then each mode at each n > 0 with the first n edits per request example. Attack
    replaces the edited training examples; repair appends the new ones."""
    from pairdots_server.perturb.attack import apply_replacements

    if 0 in ns or kind == "attack":
        yield "none", 0, 0, list(train)
    for mode, es in edits.items():
        for n in ns:
            if n == 0:
                continue
            used = first_n_per_example(es, n)
            if kind == "attack":
                new = apply_replacements(train, used)
            else:
                new = list(train) + [Example(e.new_text, e.label) for e in used]
            yield mode, n, len(used), new


def retrain_eval(
    rt: ModelRuntime, train: Sequence[Example], spec: RetrainSpec,
    evals: dict[str, Sequence[Example]], *, with_margins: bool = False,
) -> dict[str, Any]:
    """Retrain on `train`, then accuracy and mean -log p(y|x) on every eval set (and, with
    `with_margins`, each example's margin m_y under the retrained model)."""
    from pairdots_server.perturb.objectives import margins

    t0 = time.perf_counter()
    task, result, notes = retrain(rt, train, spec, lambda: None)
    out: dict[str, Any] = {"retrain_s": round(result.seconds, 1)}
    for name, ex in evals.items():
        ev = evaluate(task, list(ex), max_length=rt.max_length)
        out[name] = ev.accuracy
        out[f"{name}_loss"] = round(ev.loss, 5)  # mean -log p(y|x): moves when accuracy can't
        out[f"{name}_correct"] = [int(p == x.label)
                                  for p, x in zip(ev.predictions, ex, strict=True)]
        if with_margins:
            out[f"{name}_margins"] = [round(m, 4) for m in margins(task, ex, rt.max_length)]
    out["total_s"] = round(time.perf_counter() - t0, 1)
    out["notes"] = list(notes)  # e.g. whether a proximal retrain converged
    for n in notes:
        log(f"note: {n}")
    del task
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
