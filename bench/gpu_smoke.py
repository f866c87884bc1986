"""GPU smoke + stage timings of the Explain pipeline on CUDA, with no downloads.

A MiniLM-sized BERT (6 layers, hidden 384, 12 heads; random init, built in code, because the
packaged weights do not travel to a device machine) is fine-tuned briefly on synthetic
sentences, saved as a bundle with a candidate index (exact scan kind: needs no faiss) and
low-rank curvature, reloaded on the device, and explained with the low-rank and LiSSA solvers.

    python bench/gpu_smoke.py --device cuda --n-train 2000

Prints per-stage times; last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--index-dim", type=int, default=1024)
    args = ap.parse_args()

    from pairdots_server.influence.artifacts import (
        ArtifactConfig,
        build_index_dir,
        index_files,
        lowrank_bytes,
    )
    from pairdots_server.influence.explain import ExplainQuery, explain
    from pairdots_server.influence.runtime import LOWRANK_FILE, ModelRuntime
    from pairdots_server.influence.settings import InfluenceSettings
    from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings
    from pairdots_server.model.task import Task
    from pairdots_server.model.train import TrainConfig, fine_tune
    from pairdots_server.storage.bundle import load_bundle, save_bundle
    from pairdots_server.storage.update import update_bundle
    from pairdots_server.testing import (
        BASE_WORDS,
        build_tiny_model_dir,
        synthetic_examples,
        words_of,
    )

    out: dict[str, object] = {"device": args.device}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    train = synthetic_examples(args.n_train, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_tiny_model_dir(Path(tmp) / "m", list(BASE_WORDS) + words_of(e.text for e in train),
                             hidden=384, layers=6, heads=12)
        task = Task.from_pretrained(Path(tmp) / "m", labels=["negative", "positive"],
                                    device=args.device)
        res = fine_tune(task, train, TrainConfig(max_steps=args.steps, lr=1e-4))
        out["finetune_s"] = round(time.perf_counter() - t, 2)
        out["finetune_steps"] = res.steps
        path = save_bundle(Path(tmp) / "b", "gpu-smoke", task, train, {})
        rt = ModelRuntime(load_bundle(path, device=args.device))
        out["scope_params"] = rt.num_params
        cfg = ArtifactConfig(index_dim=args.index_dim, index_kind="exact", low_rank=24,
                             grad_batch_size=64)
        t = time.perf_counter()
        idx = build_index_dir(rt, cfg, Path(tmp) / "index", progress=False)
        out["index_build_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        files: dict[str, object] = dict(index_files(idx))
        files[LOWRANK_FILE] = lowrank_bytes(rt, cfg.low_rank)
        out["lowrank_fit_s"] = round(time.perf_counter() - t, 2)
        update_bundle(path, files, {})  # type: ignore[arg-type]
        rt = ModelRuntime(load_bundle(path, device=args.device))
        text = "the movie was a wonderful surprise"
        for name, settings, use_index in (
            ("lowrank_index", SolverSettings(method=SolverChoice.LOW_RANK), True),
            ("lowrank_exhaustive", SolverSettings(method=SolverChoice.LOW_RANK), False),
            ("lissa_index", SolverSettings(method=SolverChoice.LISSA, max_iterations=300), True),
        ):
            q = ExplainQuery(text=text, top_words=2,
                             influence=InfluenceSettings(solver=settings, use_index=use_index))
            explain(rt, q, lambda: None, default_candidates=100)  # warm-up (+ cache fill)
            rt.s_test_cache = type(rt.s_test_cache)(256)
            rt.lambda_max.clear()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            ans = explain(rt, q, lambda: None, default_candidates=100)
            total = time.perf_counter() - t
            out[name] = {"total_s": round(total, 4),
                         **{k: round(v, 4) for k, v in ans.timings.items()},
                         "candidates": ans.candidates_scored}
            print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
