"""`pairdots worker`: run Attack / Repair operations queued in a shared job store, away from
the serving replicas.

    pairdots worker --bundles ROOT --jobs-db postgresql://user:pw@host/db
                    [--output-bundles DIR] [--kinds attack,repair] [--max-concurrent 1]
                    [--lease-s 30] [--poll-s 1] [--device auto] [--log-format text|json]

The worker loads the bundles of ROOT (the same models the replicas serve), then, every
--poll-s, claims the oldest queued operation of its kinds (JobRunner in claim mode,
service/jobs/runner.py), rebuilds its job from the stored request (rpc/job_kinds.py) and runs
it, renewing its lease every --lease-s / 3. Retrained bundles (`retrain.save_as`) go to
--output-bundles (default ROOT), which must be writable and the same volume the replicas
check at submit time. SIGTERM / SIGINT: stop claiming, cancel the running jobs at their next
checkpoint within --grace-s and record them as interrupted. kill -9: the replicas (or another
worker) mark the job interrupted once its lease passes. Every flag has a PAIRDOTS_* fallback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pairdots_server.cli.flags import float_value, int_value

log = logging.getLogger("pairdots.worker")


def worker_config(args: argparse.Namespace) -> Any:
    from pairdots_server.config import JobLimits, ServerConfig

    concurrent = int(args.max_concurrent)
    return ServerConfig(
        bundles=Path(args.bundles),
        device=args.device,
        jobs_db=args.jobs_db or None,
        output_bundles=Path(args.output_bundles) if args.output_bundles else None,
        grace_s=float(args.grace_s),
        log_format=args.log_format,
        jobs=JobLimits(
            max_concurrent=concurrent,
            max_queued=concurrent,
            lease_s=float(args.lease_s),
            poll_s=float(args.poll_s),
        ),
    )


def run_worker(config: Any, kinds: list[str] | None, stop: threading.Event) -> int:
    """Load the models, claim and run jobs until `stop` is set, then drain. Returns how many
    running jobs were recorded as interrupted."""
    from pairdots_server.errors import InvalidArgument
    from pairdots_server.rpc.job_kinds import JOB_KINDS, record_builder
    from pairdots_server.service.jobs.runner import JobRunner, process_owner
    from pairdots_server.service.jobs.store import JobStore
    from pairdots_server.service.registry import ModelRegistry

    chosen = sorted(JOB_KINDS) if not kinds else kinds
    unknown = sorted(set(chosen) - set(JOB_KINDS))
    if unknown:
        raise InvalidArgument.for_field(
            "kinds",
            f"{','.join(unknown)} not a job kind workers run; use some of "
            f"{','.join(sorted(JOB_KINDS))}",
        )
    registry = ModelRegistry(
        config.bundles, device=config.resolve_device(), cache_size=config.explain.s_test_cache_size,
        scope_input_max_bytes=config.explain.scope_input_max_bytes,
    )
    registry.load_all()
    store = JobStore(config.jobs_db_spec)
    if not store.shared:
        log.warning(
            "job store %s is an SQLite file: only processes on this machine share it; "
            "use --jobs-db postgresql://... for replicas on other machines",
            store.path,
        )
    owner = process_owner("worker")
    runner = JobRunner(
        store,
        config.jobs.max_concurrent,
        config.jobs.max_queued,
        owner=owner,
        lease_s=config.jobs.lease_s,
        poll_s=config.jobs.poll_s,
        builder=record_builder(config, registry),
        kinds=chosen,
    )
    log.info(
        "worker %s ready: models %s, kinds %s, store %s, lease %.0f s",
        owner,
        ",".join(registry.names()) or "(none)",
        ",".join(chosen),
        store.path,
        config.jobs.lease_s,
    )
    try:
        stop.wait()
    finally:
        log.info("stopping: running jobs get %.1f s to reach a checkpoint", config.grace_s)
        interrupted = runner.shutdown(config.grace_s)
        if interrupted:
            log.warning("%d running job(s) recorded as interrupted", interrupted)
        store.close()
    return interrupted


def cmd_worker(args: argparse.Namespace) -> int:
    from pairdots_server.cli.logs import setup_logging

    setup_logging(args.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kinds = [k.strip() for k in (args.kinds or "").split(",") if k.strip()] or None
    run_worker(worker_config(args), kinds, stop)
    return 0


def add_worker_parser(sub: Any, env: Callable[..., Any]) -> None:
    """Add `pairdots worker` to the subcommands (env: the PAIRDOTS_* lookup of main.py)."""
    w = sub.add_parser(
        "worker",
        help="run queued Attack/Repair operations from a shared "
        "job store (serving replicas started with --no-worker queue them)",
    )
    w.add_argument(
        "--bundles", default=env("BUNDLES", "bundles"), help="bundle root: the models the jobs name"
    )
    w.add_argument(
        "--jobs-db",
        default=env("JOBS_DB"),
        help="the job store the replicas use: postgresql://user:password@host/db "
        "(or an SQLite file on this machine)",
    )
    w.add_argument(
        "--output-bundles",
        default=env("OUTPUT_BUNDLES"),
        help="writable directory for retrain.save_as bundles (default --bundles)",
    )
    w.add_argument(
        "--kinds",
        default=env("WORKER_KINDS"),
        help="comma-separated job kinds to run (default: all)",
    )
    w.add_argument(
        "--max-concurrent",
        default=env("MAX_CONCURRENT_JOBS", 1), type=int_value,
        help="jobs run at once by this worker",
    )
    w.add_argument(
        "--lease-s",
        default=env("LEASE_S", 30), type=float_value,
        help="lease of a running job; renewed every lease/3; a job whose worker "
        "died is marked interrupted this long after its last renewal",
    )
    w.add_argument("--poll-s", default=env("POLL_S", 1), type=float_value, help="how often to look for jobs")
    w.add_argument("--device", default=env("DEVICE", "auto"))
    w.add_argument("--grace-s", default=env("GRACE_S", 10), type=float_value)
    w.add_argument("--log-format", default=env("LOG_FORMAT", "text"), choices=["text", "json"])
    w.set_defaults(fn=cmd_worker)
