"""Replay the edits that bench/attack.py or bench/repair.py searched (--edits-out) with a FULL
retrain from the base checkpoint, on any torch device (the paper's protocol; a full MiniLM
fine-tune on SST-2 took ~9 min on 2 shared CPU cores).

Every table row (n = 0, then each mode at each n) fine-tunes the base checkpoint on its
training set with the bundle's recipe (saved in the edits file) and the same seed, so the rows
differ only in the edited examples; `--seeds` repeats the whole table with other seeds
(classifier-head init, batch order, dropout) to show the retraining noise; `--only` keeps some
rows (n = 0 always runs: it is the reference). Accuracy and mean -log p(y|x) on the file's
evaluation sets are reported, and for attack files what the attack targets, the salient word:
with w_ref = the top word of each sentence under the same seed's n = 0 model (L2 token score,
log p(y|x), as the attack search), `saliency_rel_change` = mean (|s(w_ref)| - |s0(w_ref)|) /
|s0(w_ref)| and `top_word_kept` = the fraction of sentences whose top word is still w_ref.

    PYTHONPATH=server python bench/retrain_edits.py --edits runs/attack_edits.json \\
        --base-model /path/to/minilm --train bundles/minilm-sst2/train.jsonl --device cuda

Prints progress on stderr, one JSON row per retrain on stdout (and to --out as it goes), and a
summary JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _perturb_common import edit_sets, log

from pairdots_server.core.saliency import token_saliency, word_scores
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.model.retrain import base_task
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainConfig, evaluate, fine_tune
from pairdots_server.perturb.objectives import Edit
from pairdots_server.storage.data import Example, read_examples


def word_saliencies(task: Task, examples: list[Example], max_length: int) -> list[list[float]]:
    """|s(x_t)| per word (Eq. 1–2, summed over word pieces) for each example's gold label,
    with the attack search's settings (InfluenceSettings defaults)."""
    import torch

    cfg = InfluenceSettings()
    params = task.scope_params()
    out = []
    for ex in examples:
        enc = task.encode([ex.text], max_length=max_length)
        with torch.no_grad():
            embeds = task.embed(enc.input_ids)  # [1,T,D]
        tok = token_saliency(task.logits_fn, params, embeds, enc.attention_mask, ex.label,
                             cfg.target, cfg.token_score)  # [T]
        words = word_scores(tok, enc.word_ids[0], len(enc.words[0]))  # [W]
        out.append([abs(float(v)) for v in words])
    return out


def saliency_vs_reference(
    now: list[list[float]], ref: list[list[float]]
) -> tuple[float, float]:
    """(mean relative change of |s| of the reference top word, fraction whose top is kept)."""
    rel, kept = [], 0
    for a, b in zip(now, ref, strict=True):
        w = max(range(len(b)), key=b.__getitem__)
        rel.append((a[w] - b[w]) / b[w] if b[w] else 0.0)
        kept += max(range(len(a)), key=a.__getitem__) == w
    return sum(rel) / len(rel), kept / len(ref)


def load(path: Path, train: list[Example]) -> dict[str, Any]:
    """The edits file, its edits as Edit objects, checked against the training set."""
    d = json.loads(path.read_text())
    d["edits"] = {m: [Edit(**e) for e in es] for m, es in d["edits"].items()}
    for es in d["edits"].values():
        for e in es:
            if d["kind"] == "attack" and train[e.train_index].text != e.original_text:
                sys.exit(f"{path}: edit of training example {e.train_index} does not match "
                         f"--train ({train[e.train_index].text[:40]!r} != "
                         f"{e.original_text[:40]!r}); pass the bundle's train.jsonl")
    d["evals"] = {k: [Example(t, int(y)) for t, y in v] for k, v in d["evals"].items()}
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edits", type=Path, nargs="+", required=True)
    p.add_argument("--base-model", type=Path, required=True, help="the base checkpoint dir")
    p.add_argument("--train", type=Path, required=True, help="the bundle's train.jsonl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's)")
    p.add_argument("--seeds", default="0", help="comma-separated recipe seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--only", default=None,
                   help="comma-separated mode:n rows to run, e.g. demote_salient:10,random:10")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="append JSON rows here as they finish")
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    train = read_examples(a.train)
    n_labels = 1 + max(ex.label for ex in train)
    labels = [f"label_{i}" for i in range(n_labels)]
    t_start = time.perf_counter()
    summary: list[dict[str, Any]] = []
    files = [load(f, train) for f in a.edits]
    only = None if a.only is None else {tuple(r.split(":")) for r in a.only.split(",")}
    for seed in (int(s) for s in a.seeds.split(",")):
        for path, d in zip(a.edits, files, strict=True):
            cfg = TrainConfig.from_dict({**d["recipe"], "scope_only": False, "seed": seed,
                                         **({"epochs": a.epochs} if a.epochs else {}),
                                         **({"max_steps": a.max_steps} if a.max_steps else {})})
            reference: list[list[float]] = []
            for mode, n, used, new_train in edit_sets(d["kind"], train, d["edits"], d["ns"]):
                if only is not None and n > 0 and (mode, str(n)) not in only:
                    continue
                t0 = time.perf_counter()
                task = base_task(a.base_model, labels, ScopeSpec(), a.device, seed)
                res = fine_tune(task, new_train, cfg)
                row: dict[str, Any] = {
                    "kind": d["kind"], "seed": seed, "mode": mode, "n": n, "edits": used,
                    "train_size": len(new_train), "final_loss": round(res.final_loss, 4),
                    "retrain_s": round(res.seconds, 1),
                }
                for name, ex in d["evals"].items():
                    ev = evaluate(task, ex, max_length=cfg.max_length)
                    row[name] = round(ev.accuracy, 4)
                    row[f"{name}_loss"] = round(ev.loss, 5)
                if d["kind"] == "attack":
                    now = word_saliencies(task, d["evals"]["accuracy"], cfg.max_length)
                    reference = reference or now  # n = 0 comes first
                    rel, kept = saliency_vs_reference(now, reference)
                    row["saliency_rel_change"] = round(rel, 4)
                    row["top_word_kept"] = round(kept, 4)
                row["total_s"] = round(time.perf_counter() - t0, 1)
                del task
                print(json.dumps(row), flush=True)
                log(f"{path.name} seed {seed} {mode} n={n}: {row}")
                if a.out is not None:
                    with a.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                summary.append(row)
    print(json.dumps({"benchmark": "retrain_edits", "retrain": "full", "device": a.device,
                      "rows": summary, "seconds": round(time.perf_counter() - t_start, 1)}))


if __name__ == "__main__":
    main()
