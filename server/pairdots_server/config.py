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
    max_batch_inputs: int = 10_000  # inputs of one ExplainBatch operation

    def __post_init__(self) -> None:
        _require(self.max_concurrent >= 1, "max_concurrent_jobs", "must be >= 1")
        _require(self.max_batch_inputs >= 1, "max_batch_inputs", "must be >= 1")
        _require(self.max_queued >= 0, "max_queued_jobs", "must be >= 0")


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
    jobs_db: Path | None = None  # default: <bundles>/.pairdots-jobs.sqlite3
    output_bundles: Path | None = None  # where Attack/Repair save_as bundles go; default bundles
    # ExplainBatch: files under this directory may be named as input_path (None: inline
    # inputs only); results go to batch_results_dir (default: beside the job store)
    batch_input_root: Path | None = None
    batch_results_dir: Path | None = None
    grace_s: float = 10.0
    log_format: str = "text"  # text | json
    explain: ExplainLimits = field(default_factory=ExplainLimits)
    jobs: JobLimits = field(default_factory=JobLimits)

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port", "must be in 0..65535")
        if self.metrics_port is not None:
            _require(0 <= self.metrics_port < 65536, "metrics_port", "must be in 0..65535")
        if self.health_port is not None:
            _require(0 <= self.health_port < 65536, "health_port", "must be in 0..65535")
            _require(
                self.health_port == 0 or self.health_port != self.port, "health_port",
                "must differ from --port (the health-only port is a second listener)",
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
        return self.jobs_db or (self.bundles / ".pairdots-jobs.sqlite3")

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
