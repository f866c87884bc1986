"""Service-level configuration as frozen dataclasses.

Math settings (solvers, curvature, saliency) live next to the code that uses them in core/;
this module holds what the service and its operators choose: limits, defaults for requests,
ports, security and job settings. Every value is validated on construction, and a bad value
raises errors.InvalidArgument saying which setting to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pairdots_server.errors import InvalidArgument


def _require(cond: bool, setting: str, why: str) -> None:
    if not cond:
        raise InvalidArgument.for_field(setting, why)


DEFAULT_TOKEN_INFLUENCE = ("auto", "exact", "exact_bf16")
"""The Eq. 8 methods a server may default to (influence/pipeline.TokenInfluence values)."""


@dataclass(frozen=True)
class ExplainLimits:
    """Defaults and bounds for Explain requests (documented in the proto comments)."""

    max_text_chars: int = 10_000
    default_top_words: int = 3
    max_top_words: int = 32
    default_examples_per_word: int = 5
    max_examples_per_word: int = 100
    # Candidates scored exactly per direction when the index prefilter is used:
    # default = clamp(candidate_fraction * N, min_candidates, max_default_candidates).
    candidate_fraction: float = 0.02
    min_candidates: int = 50
    max_default_candidates: int = 2_000
    max_candidates: int = 20_000
    # Identical queries on the same bundle reuse s_test; at most this many are kept.
    s_test_cache_size: int = 256
    # Batch size for exact scoring of candidates (per-example gradients).
    scoring_batch_size: int = 32
    # Scope-input cache (influence/scope_inputs.py): at most this many MiB of h_L rows computed
    # on demand per served bundle, least recently used evicted; 0 = unbounded. Rows from a
    # bundle's scope_inputs.safetensors are not counted (loaded whole at start).
    scope_input_cache_mb: int = 1024
    # Eq. 8 when a request leaves token_influence unspecified: "exact" (float32 [UNK] copies),
    # "exact_bf16" (the copies' trunk in bfloat16: about half the time on CPUs with native
    # bfloat16, the responsible word agreeing for ~98 %, the rest near-ties), or "auto":
    # exact_bf16 where it runs natively, else exact (influence/pipeline.resolve_token_influence).
    default_token_influence: str = "auto"

    def __post_init__(self) -> None:
        _require(self.max_text_chars > 0, "max_text_chars", "must be > 0")
        _require(
            0 < self.default_top_words <= self.max_top_words, "default_top_words",
            "must be in 1..max_top_words",
        )
        _require(
            0 < self.default_examples_per_word <= self.max_examples_per_word,
            "default_examples_per_word", "must be in 1..max_examples_per_word",
        )
        _require(0 < self.candidate_fraction <= 1, "candidate_fraction", "must be in (0, 1]")
        _require(self.min_candidates > 0, "min_candidates", "must be > 0")
        _require(self.s_test_cache_size >= 0, "s_test_cache_size", "must be >= 0")
        _require(self.scoring_batch_size > 0, "scoring_batch_size", "must be > 0")
        _require(self.scope_input_cache_mb >= 0, "scope_input_cache_mb",
                 "must be >= 0 (MiB; 0 = unbounded)")
        _require(self.default_token_influence in DEFAULT_TOKEN_INFLUENCE,
                 "default_token_influence",
                 f"must be one of {', '.join(DEFAULT_TOKEN_INFLUENCE)}")

    @property
    def scope_input_max_bytes(self) -> int | None:
        """scope_input_cache_mb in bytes; None when unbounded (0)."""
        return self.scope_input_cache_mb * 2**20 if self.scope_input_cache_mb else None

    def default_candidates(self, n_train: int) -> int:
        """clamp(fraction·N, min, max), never more than N."""
        k = round(self.candidate_fraction * n_train)
        return min(n_train, max(self.min_candidates, min(k, self.max_default_candidates)))


@dataclass(frozen=True)
class JobLimits:
    """Limits for Attack and Repair operations."""

    max_concurrent: int = 1
    max_queued: int = 8
    max_attack_examples: int = 500
    max_repair_examples: int = 5_000
    max_examples_per_test: int = 50
    # A process running a job renews its lease every lease_s / 3; a job whose lease passed
    # (its process was killed) is marked interrupted by any replica or worker (store.py).
    lease_s: float = 30.0
    poll_s: float = 1.0  # how often leases are checked and workers look for queued jobs
    max_batch_inputs: int = 10_000  # inputs of one ExplainBatch operation

    def __post_init__(self) -> None:
        _require(self.max_concurrent >= 1, "max_concurrent_jobs", "must be >= 1")
        _require(self.max_batch_inputs >= 1, "max_batch_inputs", "must be >= 1")
        _require(self.max_queued >= 0, "max_queued_jobs", "must be >= 0")
        _require(self.poll_s > 0, "jobs_poll_s", "must be > 0")
        _require(self.lease_s > self.poll_s, "lease_s",
                 "must be longer than the poll interval (jobs.poll_s, 1 s)")


@dataclass(frozen=True)
class TelemetrySettings:
    """Tracing (telemetry.py): off unless an OTLP endpoint is given (`--otlp-endpoint`)."""

    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4317 (OTLP over gRPC)
    otlp_insecure: bool = True  # plaintext OTLP (a collector inside the cluster)
    service_name: str = "pairdots"
    sample_ratio: float = 1.0  # parent-based trace-id ratio sampler

    def __post_init__(self) -> None:
        _require(0.0 <= self.sample_ratio <= 1.0, "trace_sample_ratio", "must be in 0..1")
        _require(bool(self.service_name), "otel_service_name", "must not be empty")

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)


@dataclass(frozen=True)
class ServerConfig:
    """How `pairdots serve` runs. Built from CLI flags with environment fallbacks."""

    bundles: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    metrics_port: int | None = None  # Prometheus /metrics on its own HTTP port when set
    # Plaintext gRPC port serving only grpc.health.v1 (same status as the main port) when set:
    # kubelet gRPC probes cannot speak TLS. 0 picks a free port (tests).
    health_port: int | None = None
    # HTTP/JSON endpoint (rpc/http_gateway.py, the google.api.http routes) when set; off by
    # default. 0 picks a free port (tests).
    http_port: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Explain requests handled at once (worker threads). Computations on one model still run
    # one at a time (its compute gate, shared with Attack/Repair job steps, compute.py), so
    # workers beyond the number of served models wait for their model's turn.
    max_workers: int = 1
    max_queue: int = 8  # requests waiting for a worker; beyond → RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 1024 * 1024
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set → mutual TLS (client certificates required)
    auth_tokens_file: Path | None = None  # one token per line; set → bearer auth required
    auth_tokens: tuple[str, ...] = ()
    reflection: bool = False
    # an SQLite file (default: <bundles>/.pairdots-jobs.sqlite3) or a postgresql:// URL shared
    # by every replica and worker
    jobs_db: Path | str | None = None
    output_bundles: Path | None = None  # where Attack/Repair save_as bundles go; default bundles
    # run Attack/Repair in this process (the default); False (--no-worker): only accept,
    # answer and read operations, `pairdots worker` processes run them (needs a shared store)
    run_jobs: bool = True
    # ExplainBatch: files under this directory may be named as input_path (None: inline
    # inputs only); results go to batch_results_dir (default: beside the job store)
    batch_input_root: Path | None = None
    batch_results_dir: Path | None = None
    grace_s: float = 10.0
    log_format: str = "text"  # text | json
    explain: ExplainLimits = field(default_factory=ExplainLimits)
    jobs: JobLimits = field(default_factory=JobLimits)
    # Hot reload (service/registry.py): seconds between scans of the bundle root for new,
    # changed and removed bundles; 0 turns the watcher off (bundles load at start only).
    watch_interval_s: float = 10.0
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port", "must be in 0..65535")
        _require(self.watch_interval_s >= 0, "watch_interval_s",
                 "must be >= 0 (seconds between bundle root scans; 0 = off)")
        if self.metrics_port is not None:
            _require(0 <= self.metrics_port < 65536, "metrics_port", "must be in 0..65535")
        if self.health_port is not None:
            _require(0 <= self.health_port < 65536, "health_port", "must be in 0..65535")
            _require(
                self.health_port == 0 or self.health_port != self.port, "health_port",
                "must differ from --port (the health-only port is a second listener)",
            )
        if self.http_port is not None:
            _require(0 <= self.http_port < 65536, "http_port", "must be in 0..65535")
            _require(
                self.http_port == 0 or self.http_port not in (self.port, self.health_port,
                                                              self.metrics_port),
                "http_port", "must differ from --port, --health-port and --metrics-port",
            )
        _require(self.max_workers >= 1, "max_workers", "must be >= 1")
        _require(self.max_queue >= 0, "max_queue", "must be >= 0")
        _require(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        _require(
            (self.tls_cert is None) == (self.tls_key is None), "tls_cert",
            "--tls-cert and --tls-key must be given together",
        )
        _require(
            self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca",
            "mutual TLS needs --tls-cert and --tls-key too",
        )
        _require(self.grace_s >= 0, "grace_s", "must be >= 0")
        _require(self.log_format in ("text", "json"), "log_format", "must be 'text' or 'json'")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device", "must be auto, cpu, cuda or cuda:N",
        )

    @property
    def jobs_db_path(self) -> Path:
        """The SQLite file of the job store (meaningless for a PostgreSQL URL)."""
        return Path(self.jobs_db) if self.jobs_db else (self.bundles / ".pairdots-jobs.sqlite3")

    @property
    def jobs_db_spec(self) -> Path | str:
        """What JobStore opens: the postgresql:// URL as given, else the SQLite path."""
        if isinstance(self.jobs_db, str) and self.jobs_db.startswith(
                ("postgresql://", "postgres://")):
            return self.jobs_db
        return self.jobs_db_path

    @property
    def batch_results_path(self) -> Path:
        """Where ExplainBatch writes its JSON-lines results: <job store dir>/batch-results."""
        return self.batch_results_dir or (self.jobs_db_path.parent / "batch-results")

    @property
    def output_root(self) -> Path:
        return self.output_bundles or self.bundles

    def load_tokens(self) -> tuple[str, ...]:
        """Tokens from auth_tokens plus the file (one per line, '#' comments)."""
        tokens = list(self.auth_tokens)
        if self.auth_tokens_file is not None:
            try:
                text = Path(self.auth_tokens_file).read_text()
            except OSError as exc:
                raise InvalidArgument.for_field(
                    "auth_tokens_file", f"cannot read {self.auth_tokens_file}: {exc.strerror}"
                ) from exc
            tokens += [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
        env = os.environ.get("PAIRDOTS_AUTH_TOKENS", "")
        tokens += [t.strip() for t in env.split(",") if t.strip()]
        return tuple(dict.fromkeys(tokens))

    def resolve_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
