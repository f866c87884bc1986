"""`pairdots prepare` end to end (issue 13: prepare ≤ 6 min, peak RSS ≤ 4 GB on 2 CPU cores).

Runs the real command line (`python -m pairdots_server.cli prepare`, defaults unless extra
arguments follow `--`) into a temporary bundle root, as a child process, and reports:
  wall_seconds      the whole command (reading data, fine-tune, dev evaluation, index,
                    low-rank GGN, EK-FAC, diagonal Fisher, saving and verifying the bundle);
  peak_rss_mb       the child's peak resident set (getrusage ru_maxrss of the waited child);
  stages            seconds per stage as the bundle manifest records them (train, each
                    curvature artifact with its pass timings) plus the stage starts seen on
                    the progress log (seconds since launch of each stage's first line);
  bundle_bytes      the size of each file of the new bundle.
The bundle is deleted afterwards unless --keep. Load average at start and end are recorded;
figures taken on a busy machine are marked by it.

Last line: one JSON object; also bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _results import write_result

ROOT = Path(__file__).resolve().parent.parent
# the first progress line of each stage (cli prepare / model.train / influence.artifacts)
STAGE_LINES = {
    "fine_tune": re.compile(r"^(epoch|step|fine-tun|training)", re.IGNORECASE),
    "index": re.compile(r"index|projected gradients", re.IGNORECASE),
    "lowrank": re.compile(r"low-?rank|Lanczos", re.IGNORECASE),
    "ekfac": re.compile(r"fitting ekfac", re.IGNORECASE),
    "diagonal": re.compile(r"fitting diagonal", re.IGNORECASE),
}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run(cmd: list[str], env: dict[str, str]) -> tuple[int, float, int, list[tuple[float, str]]]:
    """(exit code, wall seconds, peak RSS in KiB, [(seconds since start, stderr line)])."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            print(line, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, int(usage.ru_maxrss), lines


def stage_starts(lines: list[tuple[float, str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, line in lines:
        for stage, pat in STAGE_LINES.items():
            if stage not in out and pat.search(line):
                out[stage] = round(t, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the child")
    ap.add_argument("--keep", type=Path, default=None, help="keep the bundle under this root")
    ap.add_argument("--name", default="bench-prepare")
    ap.add_argument("--result", default="prepare", help="bench/results/<name>.json")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more prepare arguments")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    root = args.keep or Path(tempfile.mkdtemp(prefix="pairdots-prepare-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pairdots_server.cli", "prepare", "--name", args.name,
           "--out", str(root), "--overwrite", *extra]
    load0 = loadavg()
    code, wall, rss_kib, lines = run(cmd, env)
    if code != 0:
        raise SystemExit(f"prepare failed with exit code {code}; last lines:\n"
                         + "\n".join(line for _, line in lines[-20:]))
    bundle = root / args.name
    manifest = json.loads((bundle / "manifest.json").read_text())
    curv = manifest.get("curvature") or {}
    stages: dict[str, Any] = {"train": (manifest.get("train") or {}).get("seconds")}
    for kind, info in curv.items():
        stages[kind] = info.get("seconds")
        if isinstance(info.get("stats"), dict):
            stages[f"{kind}_stats"] = info["stats"]
    stages["prepare_seconds_manifest"] = manifest.get("prepare_seconds")
    sizes = {p.relative_to(bundle).as_posix(): p.stat().st_size
             for p in sorted(bundle.rglob("*")) if p.is_file()}
    payload = {
        "bench": "prepare",
        "threads": args.threads,
        "prepare_args": extra,
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(rss_kib / 1024, 1),
        "targets": {"wall_seconds": 360, "peak_rss_mb": 4096},
        "stages": stages,
        "stage_starts_on_log": stage_starts(lines),
        "dev": manifest.get("dev"),
        "bundle_bytes": sizes,
        "bundle_total_mb": round(sum(sizes.values()) / 2**20, 1),
    }
    if args.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    out = write_result(args.result, payload)
    print(f"prepare: {wall:.0f} s wall, peak RSS {rss_kib / 1024:.0f} MB -> {out}",
          file=sys.stderr)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
