"""Influence-guided against random augmentation of the same size, paired: for every n of a
bench/repair.py table, the test (and dev) accuracy difference influence − random with a
paired bootstrap interval over the evaluation sentences (the rows' per-sentence correctness).

    python3 bench/repair_vs_random.py bench/results/repair_all.json

Writes bench/results/<table name>_vs_random.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _results import write_result


def paired(a: list[int], b: list[int], draws: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """mean(a − b) and its 95 % percentile bootstrap interval, resampling sentences."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # [S]
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(draws, d.size))].mean(axis=1)  # [draws]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"difference": float(d.mean()), "ci95": [float(lo), float(hi)], "sentences": d.size}


def main() -> None:
    path = Path(sys.argv[1])
    table = json.loads(path.read_text())
    rows = table["rows"]
    out: list[dict[str, Any]] = []
    for r in rows:
        if r["mode"] != "influence":
            continue
        rnd = next((x for x in rows if x["mode"] == "random" and x["seed"] == r["seed"]
                    and x["n"] == r["n"]), None)
        if rnd is None:
            continue
        item = {"seed": r["seed"], "n": r["n"], "added": r["added"], "random_added": rnd["added"]}
        for split in ("test", "dev"):
            item[split] = paired(r["_correct"][split], rnd["_correct"][split])
        out.append(item)
        print(f"seed {r['seed']} n={r['n']}: test influence − random "
              f"{item['test']['difference']:+.4f} {item['test']['ci95']}")
    write_result(f"{path.stem}_vs_random", {"bench": "repair_vs_random", "table": str(path),
                                            "table_commit": table.get("commit"), "rows": out})


if __name__ == "__main__":
    main()
