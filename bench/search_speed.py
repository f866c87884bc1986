"""Seconds per attack edit of the greedy search (perturb/search.greedy_edits, Eq. 11–12) on a
prepared bundle (issue 12 item 5: ≤ 0.3 s per edit on CPU).

The margin s_test of --sentences SST-2 test sentences (the bundle's default solver), and for
each the --examples training examples of the predicted label that contain the sentence's top
word by c_w (as the attack's word-level target picks its sources; filled up with seeded random
examples of the label), searched with the default SearchSettings (synonyms, T = 5, ≤ 10
substitutes, one word) in the attack direction (d = −1), tracking that margin s_test.
Reported: edits made, seconds, seconds per edit (per sentence and in all), and the edits
themselves (text before → after) so that two runs can be compared for equality.

Last line: one JSON object; also bench/results/<--result-name>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from _common import load_runtime, log, no_stop, sample_sentences
from _results import write_result

from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.words import examples_containing, word_contribution
from pairdots_server.perturb.lexicon import default_lexicon
from pairdots_server.perturb.search import SearchSettings, greedy_edits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--sentences", type=int, default=3)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--result-name", default="search_speed")
    args = ap.parse_args()

    rt, _ = load_runtime(args.bundle, args.threads)
    lexicon = default_lexicon()
    settings = InfluenceSettings().resolve(rt, default_candidates=50)
    search = SearchSettings()
    per: list[dict[str, object]] = []
    total_s, total_edits = 0.0, 0
    for si, (text, _gold) in enumerate(sample_sentences(args.sentences, args.seed)):
        enc = steps.encode_text(rt, text)
        label = int(steps.predict(rt, enc).argmax())
        m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
        s, _ = steps.measurement_s_test(rt, enc, m, settings, no_stop)
        contrib = word_contribution(rt, enc, label)
        word = max(range(len(contrib)), key=lambda w: (contrib[w], -w))
        pool = [i for i, ex in enumerate(rt.bundle.train) if ex.label == label]
        allowed = set(examples_containing(rt, enc.words[word]))
        chosen = [i for i in pool if i in allowed][: args.examples]
        rng = random.Random(args.seed * 1000 + si)
        rest = [i for i in pool if i not in set(chosen)]
        chosen += rng.sample(rest, args.examples - len(chosen))
        examples = [rt.bundle.train[i] for i in chosen]
        rngs = [random.Random(args.seed * 7919 + i) for i in chosen]
        t0 = time.perf_counter()
        got = greedy_edits(rt, s, examples, -1, lexicon, search, rngs, no_stop,
                           track=s[None])
        sec = time.perf_counter() - t0
        edits = [(ex.text, e.edit.new_text) for ex, e in zip(examples, got, strict=True)
                 if e is not None]
        total_s += sec
        total_edits += len(edits)
        per.append({"text": text, "word": enc.words[word],
                    "examples": len(examples), "edits": len(edits), "seconds": sec,
                    "seconds_per_edit": sec / max(1, len(edits)), "edited": edits})
        log(f"{text[:50]!r}: {len(edits)} edits in {sec:.1f} s "
            f"({sec / max(1, len(edits)):.3f} s/edit)")
    result = {
        "bench": "search_speed", "bundle": rt.name, "threads": args.threads,
        "torch_threads": torch.get_num_threads(), "search": search.__dict__,
        "edits": total_edits, "seconds": total_s,
        "seconds_per_edit": total_s / max(1, total_edits), "sentences": per,
    }
    log(f"all: {total_edits} edits, {total_s:.1f} s, {result['seconds_per_edit']:.3f} s/edit")
    write_result(args.result_name, result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
