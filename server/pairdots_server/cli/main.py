"""`pairdots` command line: prepare / import / index / serve / explain / demo.

    pairdots prepare [--model DIR] [--train F] [--dev F] [--name N] [--out ROOT]
                     [--text-column C --label-column C] [--labels a,b,c | --classes-file F]
    pairdots import --model DIR|models:/NAME/VERSION|runs:/ID/PATH --train F [--dev F] --name N
    pairdots index build --bundle DIR [--shard I --num-shards N --out PARTS]
    pairdots index merge --bundle DIR --parts PARTS
    pairdots index scope-inputs --bundle DIR [--dtype float32|float16]
    pairdots curvature fit --bundle DIR [--kind ekfac,diagonal] [--device cpu|cuda]
    pairdots curvature show --bundle DIR
    pairdots serve --bundles ROOT [--port 50051] [--metrics-port 9090] [--no-worker] ...
    pairdots worker --bundles ROOT --jobs-db postgresql://... [--output-bundles DIR]
    pairdots explain "text" [--address host:port] [--model NAME] [--html out.html] [--json]
    pairdots explain --input F --output results.jsonl [--text-column C] (ExplainBatch)
    pairdots demo [--bundles ROOT] [--text "..."] [--html report.html]

Every flag of `serve` has a PAIRDOTS_* environment fallback (deploy/ uses them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pairdots_server.cli.demo import cmd_demo
from pairdots_server.cli.flags import float_value, int_value, optional_int_value
from pairdots_server.cli.logs import setup_logging
from pairdots_server.cli.render import print_explanation
from pairdots_server.errors import InvalidArgument, PairdotsError

DEFAULT_TEXT = "i loved it !"


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"PAIRDOTS_{name}", default)


# -- prepare / index -------------------------------------------------------------------------


def _artifact_config(args: argparse.Namespace) -> Any:
    from pairdots_server.influence.artifacts import ArtifactConfig, CurvatureConfig

    return ArtifactConfig(
        index=not getattr(args, "no_index", False),
        index_dim=args.index_dim,
        index_seed=args.index_seed,
        index_projection=args.index_projection,
        grad_batch_size=args.grad_batch_size,
        low_rank=getattr(args, "low_rank", 0),
        ekfac=not getattr(args, "no_ekfac", True),
        diagonal=not getattr(args, "no_diagonal", True),
        curvature=CurvatureConfig(batch_size=getattr(args, "curvature_batch_size", 32)),
    )


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    """PrepareConfig/ImportConfig fields from the data flags (--text-column ... --label-base)."""
    from pairdots_server.storage.labels import LabelSpec

    spec = LabelSpec.from_options(args.labels, args.classes_file, args.label_base)
    return {"text_column": args.text_column, "label_column": args.label_column,
            "labels": spec.names, "label_base": spec.base}


def cmd_prepare(args: argparse.Namespace) -> int:
    from pairdots_server.influence.artifacts import build_bundle_artifacts
    from pairdots_server.influence.runtime import ModelRuntime
    from pairdots_server.model.prepare import PrepareConfig, prepare_bundle
    from pairdots_server.model.scope import ScopeSpec
    from pairdots_server.model.train import TrainConfig
    from pairdots_server.storage.bundle import Bundle

    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        max_length=args.max_length, seed=args.seed, max_steps=args.max_steps)
    cfg = PrepareConfig(
        model_path=args.model, train_path=args.train, dev_path=args.dev, name=args.name,
        out_root=args.out, scope=ScopeSpec.from_dict({"kind": args.scope, "n": args.scope_n,
                                                      "pattern": args.scope_pattern}),
        train=train, limit_train=args.limit_train, limit_dev=args.limit_dev,
        overwrite=args.overwrite, **_data_options(args),
    )
    art = _artifact_config(args)
    extra: dict[str, Any] = {}
    if getattr(args, "default_solver", None):
        from pairdots_server.influence.solver_policy import parse_method

        choice = parse_method(args.default_solver)
        if choice is None:
            raise SystemExit(f"--default-solver {args.default_solver!r} names no solver")
        extra = {"defaults": {"solver": choice.value}}
    started = time.perf_counter()

    built: list[Any] = []

    def after_train(task: Any, examples: Any, scratch: Path) -> Any:
        rt = ModelRuntime(Bundle.unsaved(cfg.name, scratch, task, examples, train.to_dict()))
        built.append(rt)
        return build_bundle_artifacts(rt, art, scratch, progress=not args.quiet)

    path = prepare_bundle(cfg, progress=not args.quiet, after_train=after_train,
                          manifest_extra=extra)
    _store_scope_inputs(path, built[0], args)
    print(f"bundle written: {path} ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A bundle from an already fine-tuned model (dir or MLflow URI) without re-training."""
    from pairdots_server.influence.artifacts import build_bundle_artifacts
    from pairdots_server.influence.runtime import ModelRuntime
    from pairdots_server.model.importing import ImportConfig, import_bundle
    from pairdots_server.model.scope import ScopeSpec
    from pairdots_server.storage.bundle import Bundle

    cfg = ImportConfig(
        model=args.model, train_path=args.train, dev_path=args.dev or None, name=args.name,
        out_root=args.out, scope=ScopeSpec.from_dict({"kind": args.scope, "n": args.scope_n,
                                                      "pattern": args.scope_pattern}),
        max_length=args.max_length, limit_train=args.limit_train, limit_dev=args.limit_dev,
        tracking_uri=args.mlflow_tracking_uri, overwrite=args.overwrite, **_data_options(args),
    )
    art = _artifact_config(args)
    started = time.perf_counter()

    built: list[Any] = []

    def after_train(task: Any, examples: Any, scratch: Path) -> Any:
        rt = ModelRuntime(Bundle.unsaved(cfg.name, scratch, task, examples,
                                         {"max_length": cfg.max_length}))
        built.append(rt)
        return build_bundle_artifacts(rt, art, scratch, progress=not args.quiet)

    path = import_bundle(cfg, after_train=after_train)
    _store_scope_inputs(path, built[0], args)
    print(f"bundle written: {path} (imported, not re-trained; "
          f"{time.perf_counter() - started:.0f} s)")
    return 0


def _store_scope_inputs(path: Path, rt: Any, args: argparse.Namespace) -> None:
    """--scope-inputs DTYPE (default float16): add scope_inputs.safetensors to the new bundle,
    reusing the hidden states its index build computed (influence/artifacts.add_scope_inputs),
    so that the first Explain scores its candidates through the scoped top only."""
    from pairdots_server.influence.artifacts import add_scope_inputs

    if args.scope_inputs == "none" or rt.split is None:
        return
    info = add_scope_inputs(Path(path), rt, args.scope_inputs, progress=not args.quiet)
    if not args.quiet:
        print(f"scope inputs: {info['bytes'] / 2**20:.0f} MiB {info['dtype']}, "
              f"{info['reused']} of {info['count']} rows reused, {info['seconds']:.0f} s",
              file=sys.stderr)


def _load_runtime(path: str, device: str) -> Any:
    from pairdots_server.influence.runtime import ModelRuntime
    from pairdots_server.storage.bundle import load_bundle

    return ModelRuntime(load_bundle(path, device=device))


def cmd_index_build(args: argparse.Namespace) -> int:
    from pairdots_server.influence.artifacts import (
        build_index_dir,
        build_index_shard,
        index_files,
    )
    from pairdots_server.storage.update import update_bundle

    rt = _load_runtime(args.bundle, args.device)
    cfg = _artifact_config(args)
    if args.num_shards is not None or args.shard is not None:
        from pairdots_server.index.build import SHARD_ENV, shard_from_env

        # --shard wins over $JOB_COMPLETION_INDEX; --num-shards over $PAIRDOTS_NUM_SHARDS
        environ = dict(os.environ)
        if args.shard is not None:
            environ[SHARD_ENV] = str(args.shard)
        shard, num = shard_from_env(args.num_shards, environ)
        if not args.out:
            raise InvalidArgument.for_field(
                "--out", "a sharded build writes its part into a parts directory: pass "
                "--out PARTS_DIR (the same for every shard, then `pairdots index merge`)")
        part = build_index_shard(rt, cfg, shard, num, Path(args.out), not args.quiet)
        print(f"wrote {part}")
        return 0
    with tempfile.TemporaryDirectory(prefix="pairdots-index-") as tmp:
        out = build_index_dir(rt, cfg, Path(tmp) / "index", not args.quiet)
        update_bundle(args.bundle, index_files(out), {})
    print(f"index written into {args.bundle}")
    return 0


def cmd_index_merge(args: argparse.Namespace) -> int:
    from pairdots_server.influence.artifacts import index_files, merge_index_parts
    from pairdots_server.storage.update import update_bundle

    with tempfile.TemporaryDirectory(prefix="pairdots-index-") as tmp:
        out = merge_index_parts(Path(args.parts), Path(tmp) / "index")
        update_bundle(args.bundle, index_files(out), {})
    print(f"merged index written into {args.bundle}")
    return 0


def cmd_index_scope_inputs(args: argparse.Namespace) -> int:
    from pairdots_server.influence.artifacts import add_scope_inputs

    rt = _load_runtime(args.bundle, args.device)
    info = add_scope_inputs(Path(args.bundle), rt, args.dtype, not args.quiet)
    print(f"scope inputs written into {args.bundle} ({info['bytes'] / 2**20:.0f} MiB, "
          f"{info['seconds']:.0f} s)")
    return 0


# -- serve -----------------------------------------------------------------------------------


def server_config(args: argparse.Namespace) -> Any:
    from pairdots_server.config import ExplainLimits, JobLimits, ServerConfig, TelemetrySettings

    def path(v: str | None) -> Path | None:
        return Path(v) if v else None

    return ServerConfig(
        bundles=Path(args.bundles),
        host=args.host,
        port=int(args.port),
        metrics_port=int(args.metrics_port) if args.metrics_port not in (None, "") else None,
        health_port=int(args.health_port) if args.health_port not in (None, "") else None,
        http_port=int(args.http_port) if args.http_port not in (None, "") else None,
        device=args.device,
        max_workers=int(args.max_workers),
        max_queue=int(args.max_queue),
        tls_cert=path(args.tls_cert),
        tls_key=path(args.tls_key),
        tls_client_ca=path(args.tls_client_ca),
        auth_tokens_file=path(args.auth_tokens_file),
        reflection=bool(args.reflection),
        jobs_db=args.jobs_db or None,
        output_bundles=path(args.output_bundles),
        run_jobs=not args.no_worker,
        batch_input_root=path(args.batch_input_root),
        batch_results_dir=path(args.batch_results_dir),
        grace_s=float(args.grace_s),
        log_format=args.log_format,
        jobs=JobLimits(lease_s=float(args.lease_s)),
        explain=ExplainLimits(scope_input_cache_mb=int(args.scope_input_cache_mb),
                              default_token_influence=args.default_token_influence),
        watch_interval_s=float(args.watch_interval_s),
        telemetry=TelemetrySettings(
            otlp_endpoint=args.otlp_endpoint or None,
            otlp_insecure=not args.otlp_tls,
            service_name=args.otel_service_name,
            sample_ratio=float(args.trace_sample_ratio),
        ),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from pairdots_server.rpc.app import serve

    setup_logging(args.log_format)
    asyncio.run(serve(server_config(args)))
    return 0


# -- explain / demo --------------------------------------------------------------------------


def explain_call(client: Any, args: argparse.Namespace, model: str) -> Any:
    return client.explain(
        args.text, model=model, target_label=args.target_label, gold_label=args.gold_label,
        top_words=args.top_words, examples_per_word=args.examples,
        timeout=args.timeout,
    )


def cmd_explain(args: argparse.Namespace) -> int:
    from pairdots import ClientConfig, PairdotsClient

    overrides: dict[str, Any] = {"address": args.address} if args.address else {}
    if args.timeout:
        overrides["default_timeout_s"] = args.timeout
    if (args.text is None) == (args.input is None and args.server_input is None):
        raise InvalidArgument.for_field(
            "text", "pass a text to explain, or --input FILE (or --server-input PATH) with "
            "--output results.jsonl for a batch")
    with PairdotsClient(ClientConfig.from_env(**overrides)) as client:
        model = args.model or client.list_models()[0].name
        if args.text is None:
            from pairdots_server.cli.batch import run_batch

            return run_batch(client, args, model)
        expl = explain_call(client, args, model)
    if args.json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(expl.raw) if getattr(expl, "raw", None) is not None else expl)
    else:
        print_explanation(expl)
    if args.html:
        from pairdots.report import write_html

        write_html(expl, args.html)
        print(f"HTML report: {args.html}")
    return 0


# -- parser ----------------------------------------------------------------------------------


def _add_artifact_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-dim", type=int, default=None,
                   help="projection dimension k of the candidate index (default: 4096 when "
                        "the index (N*k*4 bytes) fits 256 MiB, else 2048 when it fits, else "
                        "1024; 1024 for --index-projection gaussian)")
    p.add_argument("--index-seed", type=int, default=0, help="projection seed")
    p.add_argument("--index-projection", choices=["sparse_sign", "gaussian"],
                   default="sparse_sign",
                   help="sparse_sign (CountSketch, 12 bytes per scoped parameter; default) or "
                        "gaussian (the dense P*k matrix of older bundles: 7.9 GB for MiniLM "
                        "at k = 1024)")
    p.add_argument("--grad-batch-size", type=int, default=32,
                   help="training examples per per-example-gradient batch")
    p.add_argument("--device", default=_env("DEVICE", "cpu"), help="cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_scope_inputs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scope-inputs", choices=("float16", "float32", "none"), default="float16",
                   help="store every training example's hidden states entering the influence "
                        "scope in the bundle (default float16: 2 bytes per value, ~118 MiB for "
                        "SST-2 on MiniLM), so exact scoring runs through the scope only from "
                        "the first query; none: computed on first use instead")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default="text",
                   help="column / key holding the text (CSV or TSV header, JSONL, Parquet)")
    p.add_argument("--label-column", default="label", help="column / key holding the label")
    p.add_argument("--labels", default=None,
                   help="class names in index order, comma-separated (a,b,c); labels in the data "
                        "may be these names or integers 0..C-1 (1..C: --label-base 1); "
                        "default: read the classes from the training data")
    p.add_argument("--classes-file", default=None,
                   help="file with one class name a line (e.g. AG News classes.txt; "
                        "integer labels 1..C are then read as 1-based)")
    p.add_argument("--label-base", type=int, choices=[0, 1], default=None,
                   help="integer labels start at 0 or 1 (default: from the data)")


def _add_explain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-label", type=int, default=None, help="label to explain "
                   "(default: the prediction)")
    p.add_argument("--gold-label", type=int, default=None,
                   help="gold label: also explain it when it differs (error analysis)")
    p.add_argument("--top-words", type=int, default=None, help="salient words to explain (3)")
    p.add_argument("--examples", type=int, default=0, help="training examples per word (5)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--html", default=None, help="write a self-contained HTML report here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairdots", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="fine-tune a model and write a bundle")
    p.add_argument("--model", default=None,
                   help="local HF model dir (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--train", default=None, help="training file (default: SST-2 train.tsv)")
    p.add_argument("--dev", default=None, help="dev file (default: SST-2 dev.tsv)")
    _add_data_flags(p)
    p.add_argument("--name", default="minilm-sst2", help="bundle name")
    p.add_argument("--out", default=_env("BUNDLES", "bundles"), help="bundle root directory")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-dev", type=int, default=None)
    p.add_argument("--scope", default="default",
                   choices=["default", "head", "last_n", "all", "pattern"],
                   help="parameters influence is computed over")
    p.add_argument("--scope-n", type=int, default=1)
    p.add_argument("--scope-pattern", default=None)
    p.add_argument("--no-index", action="store_true", help="skip the candidate index")
    p.add_argument("--low-rank", type=int, default=24,
                   help="rank of the precomputed GGN eigendecomposition (0: none)")
    p.add_argument("--no-ekfac", action="store_true",
                   help="skip the EK-FAC factors (add them later: `pairdots curvature fit`)")
    p.add_argument("--no-diagonal", action="store_true",
                   help="skip the diagonal Fisher (add it later: `pairdots curvature fit`)")
    _add_scope_inputs_flag(p)
    p.add_argument("--curvature-batch-size", type=int, default=32,
                   help="training examples per batch of the EK-FAC / diagonal fits")
    p.add_argument("--default-solver", default=None,
                   help="declare the bundle's default solver (manifest defaults.solver), e.g. "
                        "ekfac; default: low_rank when fitted, else lissa")
    p.add_argument("--overwrite", action="store_true")
    _add_artifact_flags(p)
    p.set_defaults(fn=cmd_prepare)

    im = sub.add_parser("import", help="a bundle from an already fine-tuned classifier "
                        "(HF dir or MLflow models:/ runs:/ URI), without re-training")
    im.add_argument("--model", required=True,
                    help="HF sequence-classification dir, or models:/NAME/VERSION, "
                         "models:/NAME@ALIAS, runs:/RUN_ID/PATH (needs pairdots[mlflow])")
    im.add_argument("--mlflow-tracking-uri", default=_env("MLFLOW_TRACKING_URI"),
                    help="MLflow tracking/registry server (default $MLFLOW_TRACKING_URI)")
    im.add_argument("--train", required=True, help="the data the model was fine-tuned on")
    im.add_argument("--dev", default=None, help="dev file to evaluate the model on")
    _add_data_flags(im)
    im.add_argument("--name", required=True, help="bundle name")
    im.add_argument("--out", default=_env("BUNDLES", "bundles"), help="bundle root directory")
    im.add_argument("--max-length", type=int, default=128, help="tokens per example")
    im.add_argument("--limit-train", type=int, default=None)
    im.add_argument("--limit-dev", type=int, default=None)
    im.add_argument("--scope", default="default",
                    choices=["default", "head", "last_n", "all", "pattern"])
    im.add_argument("--scope-n", type=int, default=1)
    im.add_argument("--scope-pattern", default=None)
    im.add_argument("--no-index", action="store_true", help="skip the candidate index")
    im.add_argument("--low-rank", type=int, default=24,
                    help="rank of the precomputed GGN eigendecomposition (0: none)")
    im.add_argument("--no-ekfac", action="store_true", help="skip the EK-FAC factors")
    im.add_argument("--no-diagonal", action="store_true", help="skip the diagonal Fisher")
    _add_scope_inputs_flag(im)
    im.add_argument("--curvature-batch-size", type=int, default=32)
    im.add_argument("--overwrite", action="store_true")
    _add_artifact_flags(im)
    im.set_defaults(fn=cmd_import)

    idx = sub.add_parser("index", help="build or merge a bundle's candidate index")
    isub = idx.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="(re)build the index, whole or one shard")
    b.add_argument("--bundle", required=True)
    b.add_argument("--shard", type=int, default=None,
                   help="shard index (default: $JOB_COMPLETION_INDEX when --num-shards is set)")
    b.add_argument("--num-shards", type=int, default=None)
    b.add_argument("--out", default=None, help="parts directory for a sharded build")
    _add_artifact_flags(b)
    b.set_defaults(fn=cmd_index_build)
    m = isub.add_parser("merge", help="merge shard parts into the bundle's index")
    m.add_argument("--bundle", required=True)
    m.add_argument("--parts", required=True)
    m.set_defaults(fn=cmd_index_merge)
    si = isub.add_parser("scope-inputs", help="store every training example's hidden states "
                         "entering the influence scope (faster exact scoring)")
    si.add_argument("--bundle", required=True)
    si.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    si.add_argument("--device", default="cpu")
    si.add_argument("--quiet", action="store_true")
    si.set_defaults(fn=cmd_index_scope_inputs)

    from pairdots_server.cli.curvature import add_curvature_parser

    add_curvature_parser(sub, _env)

    from pairdots_server.cli.worker import add_worker_parser

    add_worker_parser(sub, _env)

    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--bundles", default=_env("BUNDLES", "bundles"))
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    s.add_argument("--port", default=_env("PORT", 50051), type=int_value)
    s.add_argument("--metrics-port", default=_env("METRICS_PORT"), type=optional_int_value)
    s.add_argument("--health-port", default=_env("HEALTH_PORT"), type=optional_int_value,
                   help="plaintext port serving only grpc.health.v1 (for kubelet probes when "
                   "--tls-cert is set); same status as the main port")
    s.add_argument("--http-port", default=_env("HTTP_PORT"), type=optional_int_value,
                   help="also serve the API as HTTP/JSON on this port (the google.api.http "
                   "routes, e.g. POST /v1/models/NAME:explain; HTTPS under --tls-cert); off "
                   "by default")
    s.add_argument("--device", default=_env("DEVICE", "auto"))
    s.add_argument("--max-workers", default=_env("MAX_WORKERS", 1), type=int_value,
                   help="Explain requests handled at once; one model runs one computation at "
                   "a time (Explain and Attack/Repair steps take turns), so more workers than "
                   "served models only wait for their model's turn")
    s.add_argument("--max-queue", default=_env("MAX_QUEUE", 8), type=int_value,
                   help="requests waiting for a worker; beyond that RESOURCE_EXHAUSTED with "
                   "RetryInfo")
    s.add_argument("--tls-cert", default=_env("TLS_CERT"))
    s.add_argument("--tls-key", default=_env("TLS_KEY"))
    s.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA"))
    s.add_argument("--auth-tokens-file", default=_env("AUTH_TOKENS_FILE"))
    s.add_argument("--reflection", action="store_true",
                   default=_env("REFLECTION", "") in ("1", "true"))
    s.add_argument("--jobs-db", default=_env("JOBS_DB"),
                   help="job store: an SQLite file (default <bundles>/.pairdots-jobs.sqlite3) "
                   "or postgresql://user:password@host/db shared by replicas and workers")
    s.add_argument("--output-bundles", default=_env("OUTPUT_BUNDLES"),
                   help="writable directory for retrain.save_as bundles (default --bundles); "
                   "checked when Attack/Repair is submitted")
    s.add_argument("--no-worker", action="store_true",
                   default=_env("NO_WORKER", "") in ("1", "true"),
                   help="run no jobs here: Attack/Repair are queued in the (shared) job store "
                   "for `pairdots worker` processes; this replica accepts, answers and reads")
    s.add_argument("--lease-s", default=_env("LEASE_S", 30), type=float_value,
                   help="lease of a job this process holds (renewed every lease/3)")
    s.add_argument("--batch-input-root", default=_env("BATCH_INPUT_ROOT"),
                   help="ExplainBatch may read input files under this directory (default: "
                        "inline inputs only)")
    s.add_argument("--batch-results-dir", default=_env("BATCH_RESULTS_DIR"),
                   help="where ExplainBatch writes its JSON-lines results (default: "
                        "batch-results/ beside the job store)")
    s.add_argument("--grace-s", default=_env("GRACE_S", 10), type=float_value)
    s.add_argument("--log-format", default=_env("LOG_FORMAT", "text"), choices=["text", "json"])
    # hot reload and telemetry (rpc/app.py, telemetry.py)
    s.add_argument("--scope-input-cache-mb", default=_env("SCOPE_INPUT_CACHE_MB", 1024), type=int_value,
                   help="MiB of scope inputs (hidden states below the influence scope) kept "
                   "per bundle when computed on demand, least recently used dropped first; "
                   "0 = unbounded; a bundle's scope_inputs.safetensors is not counted")
    s.add_argument("--default-token-influence", default=_env("DEFAULT_TOKEN_INFLUENCE", "auto"),
                   choices=["auto", "exact", "exact_bf16"],
                   help="Eq. 8 for requests that leave token_influence unspecified: exact "
                   "(float32 [UNK] copies), exact_bf16 (their trunk in bfloat16: about half "
                   "the time on CPUs with native bfloat16, GPUs not measured; the responsible "
                   "word agreed with exact for 98.4 %% of 314 returned examples on minilm-sst2, "
                   "the others were near-ties), or auto (default): exact_bf16 for a float32 "
                   "model on a device with native bfloat16 products, else exact")
    s.add_argument("--watch-interval-s", default=_env("WATCH_INTERVAL_S", 10), type=float_value,
                   help="seconds between scans of --bundles for new, changed and removed "
                   "bundles (loaded verified, without a restart); 0 = load at start only")
    s.add_argument("--otlp-endpoint", default=_env("OTLP_ENDPOINT", ""),
                   help="OTLP/gRPC collector for OpenTelemetry traces, e.g. "
                   "http://otel-collector:4317 (needs the telemetry extra); empty = off")
    s.add_argument("--otlp-tls", action="store_true",
                   default=_env("OTLP_TLS", "") in ("1", "true"),
                   help="use TLS to the OTLP collector (default plaintext)")
    s.add_argument("--otel-service-name", default=_env("OTEL_SERVICE_NAME", "pairdots"))
    s.add_argument("--trace-sample-ratio", default=_env("TRACE_SAMPLE_RATIO", 1.0), type=float_value,
                   help="fraction of traces sampled (parent-based), 0..1")
    s.set_defaults(fn=cmd_serve)

    e = sub.add_parser("explain", help="explain a sentence through a running server")
    e.add_argument("text", nargs="?", default=None,
                   help="the text (or --input FILE --output results.jsonl for a batch)")
    e.add_argument("--input", default=None,
                   help="batch: a local file of inputs (.txt one a line, or CSV/TSV/JSONL/"
                        "Parquet with --text-column), sent inline as one ExplainBatch")
    e.add_argument("--server-input", default=None,
                   help="batch: a file under the server's --batch-input-root instead")
    e.add_argument("--output", default=None, help="batch: JSON-lines results file to write")
    e.add_argument("--text-column", default="text", help="batch: the text column")
    e.add_argument("--label-column", default="", help="batch: a gold-label column (optional)")
    e.add_argument("--id-column", default="", help="batch: an id column (optional)")
    e.add_argument("--no-progress", action="store_true", help="batch: no progress bar")
    e.add_argument("--address", default=None, help="host:port (default $PAIRDOTS_ADDRESS or "
                   "localhost:50051)")
    e.add_argument("--model", default=None, help="model name (default: the first served)")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_explain_flags(e)
    e.set_defaults(fn=cmd_explain)

    d = sub.add_parser("demo", help="prepare (if missing), serve, explain, write HTML, stop")
    d.add_argument("--bundles", default=_env("BUNDLES", "bundles"))
    d.add_argument("--name", default="minilm-sst2")
    d.add_argument("--text", default=DEFAULT_TEXT)
    d.add_argument("--train", default=None)
    d.add_argument("--dev", default=None)
    d.add_argument("--limit-train", type=int, default=None)
    _add_explain_flags(d)
    d.set_defaults(fn=cmd_demo, html="pairdots-report.html")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pairdots.errors import PairdotsError as ClientError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except PairdotsError as exc:
        print(f"pairdots: error: {exc.message}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"pairdots: server answered {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
