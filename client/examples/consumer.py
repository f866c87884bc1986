"""Example consumer of the pairdots client.

Lists the served models, explains one sentence, and prints for every salient word the
training example that most supports it (largest I(z, w), paper Eq. 5) with its responsible
word (Eq. 8). Optionally writes the HTML report.

    PAIRDOTS_ADDRESS=localhost:50051 PAIRDOTS_TOKEN=... \
        python client/examples/consumer.py "the acting is wooden but the story is moving" \
        --report report.html
"""

from __future__ import annotations

import argparse
import sys

from pairdots import ClientConfig, PairdotsClient, PairdotsError
from pairdots.report import write_html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default="a gripping , funny and moving film")
    parser.add_argument("--model", default=None, help="model name (default: the first served)")
    parser.add_argument("--top-words", type=int, default=3)
    parser.add_argument("--report", default=None, help="write the HTML report here")
    args = parser.parse_args(argv)

    config = ClientConfig.from_env()
    try:
        with PairdotsClient(config) as client:
            models = client.list_models()
            for m in models:
                print(f"model {m.name}: labels={list(m.labels)} train={m.training_examples} "
                      f"dev_acc={m.dev_accuracy:.3f} solver={m.default_solver.name}")
            if not models:
                print("the server serves no models", file=sys.stderr)
                return 1
            model = args.model or models[0].name
            expl = client.explain(args.text, model=model, top_words=args.top_words,
                                  examples_per_word=3)
    except PairdotsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    probs = ", ".join(f"{p:.3f}" for p in expl.prediction.probabilities)
    print(f"prediction: {expl.prediction.label_name} (p = [{probs}])")
    target = expl.target
    if target is None:
        return 0
    for sw in target.salient_words:
        print(f"salient word {sw.text!r} (saliency {sw.saliency:+.4f})")
        if not sw.supporting:
            print("  no supporting training example returned")
            continue
        top = sw.supporting[0]
        resp = top.responsible
        because = f", responsible word {resp.text!r} ({resp.influence:+.3g})" if resp else ""
        print(f"  top supporting: train #{top.train_index} [{top.label_name}] "
              f"I={top.influence:+.3g}{because}\n    {top.text}")
    for warning in expl.diagnostics.warnings:
        print(f"warning: {warning}")
    if args.report:
        print(f"report written to {write_html(expl, args.report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
