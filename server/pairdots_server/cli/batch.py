"""`pairdots explain --input FILE --output results.jsonl`: one ExplainBatch operation through a
running server, a progress bar while it runs, then its results paged into a JSON-lines file
(the server's format: {"index", "id", "response": ExplainResponse as JSON} or
{"index", "id", "error": {"code", "message"}})."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pairdots_server.errors import InvalidArgument


def _inputs(client: Any, args: argparse.Namespace, model: str) -> list[tuple[str, int | None, str]]:
    from pairdots_server.storage.inputs import read_text_inputs

    labels = list(client.get_model(model).labels) if args.label_column else None
    rows = read_text_inputs(
        args.input,
        text_column=args.text_column,
        label_column=args.label_column,
        id_column=args.id_column,
        label_names=labels,
    )
    return [(r.text, r.gold_label, r.id) for r in rows]


def run_batch(client: Any, args: argparse.Namespace, model: str) -> int:
    """Start the batch, show its progress, write every result to args.output."""
    from tqdm import tqdm

    if not args.output:
        raise InvalidArgument.for_field(
            "--output", "a batch writes its results to a file: pass --output results.jsonl"
        )
    options: dict[str, Any] = {
        "model": model,
        "top_words": args.top_words,
        "examples_per_word": args.examples,
    }
    if args.server_input:
        op = client.explain_batch(
            input_path=args.server_input,
            text_column=args.text_column,
            label_column=args.label_column,
            id_column=args.id_column,
            **options,
        )
    else:
        op = client.explain_batch(_inputs(client, args, model), **options)
    bar = tqdm(total=None, unit="input", desc="explaining", disable=args.no_progress)

    def progress(p: Any) -> None:
        if p.stage == "explaining" and p.total:
            bar.total = p.total
            bar.n = p.done
            bar.refresh()

    try:
        outcome = client.wait_operation(
            op.name, timeout=args.timeout or 7 * 24 * 3600.0, progress=progress
        )
    finally:
        bar.close()
    from google.protobuf.json_format import MessageToDict

    written = 0
    token = ""
    with Path(args.output).open("w", encoding="utf-8") as out:
        while True:
            page = client.batch_results(op.name, page_size=200, page_token=token)
            for item in page.items:
                line: dict[str, Any] = {"index": item.index, "id": item.id}
                if item.explanation is not None:
                    line["response"] = MessageToDict(
                        item.explanation.raw, preserving_proto_field_name=True
                    )
                else:
                    line["error"] = {"code": item.error_code, "message": item.error_message}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            token = page.next_page_token
            if not token or not page.items:
                break
    print(
        f"{written} results written to {args.output} ({outcome.succeeded_count} explained, "
        f"{outcome.failed_count} failed, {outcome.inputs_per_second:.2f} inputs/s; "
        f"operation {op.name})"
    )
    return 0
