"""`pairdots demo`: prepare the default bundle if missing, serve it on localhost in a thread,
Explain one sentence, print it and write the HTML report, stop the server."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pairdots_server.cli.logs import setup_logging
from pairdots_server.cli.render import print_explanation


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare the default bundle if missing, serve it on localhost, Explain, write HTML, stop."""
    import asyncio
    import threading

    from pairdots import ClientConfig, PairdotsClient
    from pairdots.report import write_html
    from pairdots_server.cli.main import build_parser, cmd_prepare, explain_call
    from pairdots_server.config import ServerConfig
    from pairdots_server.rpc.app import create_server

    started = time.perf_counter()
    bundles = Path(args.bundles)
    if not (bundles / args.name / "manifest.json").exists():
        print(f"no bundle {args.name!r} under {bundles}: preparing it (fine-tune + index)...")
        prep = build_parser().parse_args(
            ["prepare", "--name", args.name, "--out", str(bundles)]
            + (["--train", args.train] if args.train else [])
            + (["--dev", args.dev] if args.dev else [])
            + (["--limit-train", str(args.limit_train)] if args.limit_train else [])
        )
        cmd_prepare(prep)
    setup_logging("text", "WARNING")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def run_server() -> None:
        app, port = await create_server(ServerConfig(bundles=bundles, port=0, grace_s=1))
        holder["app"], holder["port"] = app, port
        ready.set()
        holder["stop"] = asyncio.Event()
        await holder["stop"].wait()
        await app.stop(1)

    thread = threading.Thread(target=lambda: loop.run_until_complete(run_server()), daemon=True)
    thread.start()
    if not ready.wait(timeout=600):
        raise SystemExit("the server did not start within 10 minutes")
    try:
        with PairdotsClient(ClientConfig(address=f"127.0.0.1:{holder['port']}",
                                         default_timeout_s=1800)) as client:
            print("models:", ", ".join(m.name for m in client.list_models()))
            expl = explain_call(client, args, args.name)
        print_explanation(expl)
        write_html(expl, args.html)
        print(f"\nHTML report: {args.html}")
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(timeout=30)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0
