"""Share of substitutions a simple fluency check flags (issue item 6): the substitute's dominant
WordNet part of speech differs from the replaced word's (perturb/search.pos_mismatch), over
every substitutable word of the first --sentences SST-2 training sentences and its first
--top synonyms (and antonyms), without and with the search's POS agreement (SearchSettings
.pos_agreement). Lexicon only: no model is loaded. JSON: bench/results/pos_agreement.json.

    PYTHONPATH=server:client python bench/pos_agreement.py --sentences 500
"""

from __future__ import annotations

import argparse
import re

from _perturb_common import SST2, log
from _results import write_result

from pairdots_server.perturb.lexicon import default_lexicon
from pairdots_server.perturb.search import RELATIONS, pos_mismatch, word_substitutes
from pairdots_server.storage.data import read_examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=500)
    p.add_argument("--top", type=int, default=10, help="substitutes per word (the search's)")
    a = p.parse_args()
    lex = default_lexicon()
    train = read_examples(SST2 / "train.tsv", limit=a.sentences)
    out: dict[str, dict[str, float]] = {}
    for agree in (False, True):
        pairs = flagged = words = covered = 0
        examples: list[str] = []
        for ex in train:
            for w in re.findall(r"[a-z]+", ex.text.lower()):
                subs = word_substitutes(lex, w, RELATIONS, a.top, agree)
                if not subs:
                    continue
                words += 1
                covered += 1
                for s, _ in subs:
                    pairs += 1
                    if pos_mismatch(lex, w, s):
                        flagged += 1
                        if len(examples) < 8:
                            examples.append(f"{w} -> {s}")
        name = "pos_agreement" if agree else "no_agreement"
        out[name] = {"word_occurrences_with_substitutes": words, "pairs": pairs,
                     "flagged": flagged, "flagged_share": flagged / max(1, pairs),
                     "examples_flagged": examples}  # type: ignore[dict-item]
        log(f"{name}: {flagged}/{pairs} = {flagged / max(1, pairs):.3f} flagged; "
            f"{words} word occurrences with substitutes; e.g. {examples[:4]}")
    path = write_result("pos_agreement", {"benchmark": "pos_agreement",
                                          "sentences": len(train), "top": a.top, **out})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
