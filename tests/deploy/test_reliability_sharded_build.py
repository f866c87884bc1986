"""Issue 14 item 12: the sharded index build runs, exactly as the Helm Indexed Job runs it.

The chart is rendered with a tiny bundle and a local parts directory; the index-build
container's shell script runs once per shard (N real processes, JOB_COMPLETION_INDEX set as
Kubernetes sets it for an Indexed Job), then the index-merge container's command line; the
merged index must equal the unsharded `pairdots index build` of the same bundle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pairdots_server.index.store import load_index_data
from pairdots_server.testing import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
SHARDS = 3
PAIRDOTS = [sys.executable, "-m", "pairdots_server.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "server"), str(REPO / "client"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for o in objects if o["kind"] == "Job"
            for c in o["spec"]["template"]["spec"]["containers"]}


def test_chart_sharded_build_then_merge_equals_unsharded(render: ModuleType,
                                                         tmp_path: Path) -> None:
    whole = make_tiny_bundle(tmp_path / "a", "tiny", n_train=24, finetune_steps=4)
    sharded = tmp_path / "b" / "tiny"
    shutil.copytree(whole, sharded)
    parts_root = tmp_path / "parts"

    objects = render.render_manifests({
        "server": {"enabled": False},
        "indexBuild": {"enabled": True, "hooks": False, "device": "cpu", "shards": SHARDS,
                       "bundle": str(sharded), "extraArgs": ["--index-dim=16"],
                       "parts": {"existingClaim": "shared", "mountPath": str(parts_root)}},
    }, release="pd", namespace="ml")
    jobs = _containers(objects)
    script = jobs["index-build"]["args"][0]
    assert jobs["index-build"]["command"] == ["/bin/sh", "-ec"]
    assert "pairdots index build" in script and "$JOB_COMPLETION_INDEX" in script
    # `pairdots` is this checkout's CLI (the image's entry point)
    local = script.replace("pairdots index build", " ".join(PAIRDOTS) + " index build")
    procs = [subprocess.Popen(["/bin/sh", "-ec", local], env=_env(JOB_COMPLETION_INDEX=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(SHARDS)]
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"shard {i}: {out}"
    merge = jobs["index-merge"]
    assert merge["args"][:2] == ["index", "merge"]
    done = subprocess.run(PAIRDOTS + merge["args"], env=_env(), capture_output=True, text=True, check=False,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    done = subprocess.run(PAIRDOTS + ["index", "build", f"--bundle={whole}", "--index-dim=16",
                                      "--device=cpu", "--quiet"],
                          env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    ids_a, vec_a, meta_a = load_index_data(whole / "index")
    ids_b, vec_b, meta_b = load_index_data(sharded / "index")
    assert meta_a.count == meta_b.count == 24 and meta_a.out_dim == meta_b.out_dim == 16
    assert meta_a.projection_seed == meta_b.projection_seed
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(vec_a, vec_b, rtol=1e-4, atol=1e-6)


def test_cli_shard_flags_win_over_the_environment(tmp_path: Path) -> None:
    """`--shard 1 --num-shards 2` (the README's form) with no JOB_COMPLETION_INDEX set."""
    bundle = make_tiny_bundle(tmp_path, "tiny", n_train=8, finetune_steps=2)
    env = _env()
    env.pop("JOB_COMPLETION_INDEX", None)
    done = subprocess.run(PAIRDOTS + ["index", "build", "--bundle", str(bundle), "--shard", "1",
                                      "--num-shards", "2", "--out", str(tmp_path / "parts"),
                                      "--index-dim", "8", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "parts" / "part-00001-of-00002.json").exists()
    missing = subprocess.run(PAIRDOTS + ["index", "build", "--bundle", str(bundle), "--shard",
                                         "0", "--num-shards", "2", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=600, check=False)
    assert missing.returncode == 2 and "--out" in missing.stderr
