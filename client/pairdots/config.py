"""Client configuration: one frozen dataclass, validated on construction.

`ClientConfig()` talks plaintext to localhost:50051 without a token. `ClientConfig.from_env()`
reads the PAIRDOTS_* environment variables listed on that method (the bearer token comes from
PAIRDOTS_TOKEN there). No environment variable is read anywhere else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import grpc

__all__ = ["ClientConfig"]

_MIB = 1024 * 1024
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(
            f"ClientConfig.{what}: cannot read {path!r} ({exc.strerror}); "
            "point it at a readable PEM file"
        ) from exc


@dataclass(frozen=True)
class ClientConfig:
    """How to reach a pairdots server and how to behave on failures.

    Retries (UNAVAILABLE and RESOURCE_EXHAUSTED only) wait
    ``min(retry_max_backoff_s, retry_initial_backoff_s * retry_backoff_multiplier**k)``
    before retry k+1 (k = 0, 1, ...), shortened by a random fraction of at most
    ``retry_jitter``; a google.rpc.RetryInfo delay from the server replaces that wait. Every
    attempt of one call shares that call's deadline (``timeout`` or ``default_timeout_s``).
    """

    #: host:port of the server (any gRPC target string, e.g. "dns:///pairdots:50051").
    address: str = "localhost:50051"
    #: Use TLS. With no root_certificates the system trust store is used.
    tls: bool = False
    #: PEM file with the CA certificates that sign the server's certificate (TLS).
    root_certificates: str | None = None
    #: PEM files with the client certificate and its key (mutual TLS; set both or neither).
    client_certificate: str | None = None
    client_key: str | None = None
    #: Override the TLS server name checked against the certificate (tests, IP addresses).
    server_name_override: str | None = None
    #: Bearer token sent as `authorization: Bearer <token>` on every call.
    token: str | None = field(default=None, repr=False)
    #: Model used when a call does not name one ("" = every call must name its model).
    default_model: str = ""
    #: Deadline of every call that passes no `timeout`, seconds (covers all its retries).
    default_timeout_s: float = 60.0
    #: Longest wait_operation() waits when it is given no timeout, seconds.
    wait_timeout_s: float = 3600.0
    #: How often wait_operation() reports progress (length of one WaitOperation call), seconds.
    poll_interval_s: float = 1.0
    #: Retries after the first attempt (0 disables retrying).
    max_retries: int = 3
    retry_initial_backoff_s: float = 0.2
    retry_max_backoff_s: float = 5.0
    retry_backoff_multiplier: float = 2.0
    #: Fraction in [0, 1] of each backoff that may be randomly cut off (0 = no jitter).
    retry_jitter: float = 0.2
    #: Largest message sent or received, bytes.
    max_message_bytes: int = 64 * _MIB
    #: Extra channel arguments, e.g. (("grpc.keepalive_time_ms", 30000),).
    channel_options: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("ClientConfig.address is empty; set it to host:port, e.g. localhost:50051")
        for name in ("default_timeout_s", "wait_timeout_s", "poll_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ClientConfig.{name}={value!r}; set a finite number of seconds > 0")
        if self.max_retries < 0:
            raise ValueError(f"ClientConfig.max_retries={self.max_retries}; use 0 (no retries) or more")
        if not (math.isfinite(self.retry_initial_backoff_s) and self.retry_initial_backoff_s >= 0):
            raise ValueError(
                f"ClientConfig.retry_initial_backoff_s={self.retry_initial_backoff_s!r}; "
                "use a finite number of seconds >= 0")
        if not (math.isfinite(self.retry_max_backoff_s)
                and self.retry_max_backoff_s >= self.retry_initial_backoff_s):
            raise ValueError(
                f"ClientConfig.retry_max_backoff_s={self.retry_max_backoff_s!r}; use a finite "
                f"value >= retry_initial_backoff_s ({self.retry_initial_backoff_s})")
        if not (math.isfinite(self.retry_backoff_multiplier) and self.retry_backoff_multiplier >= 1):
            raise ValueError(
                f"ClientConfig.retry_backoff_multiplier={self.retry_backoff_multiplier!r}; use >= 1")
        if not (0.0 <= self.retry_jitter <= 1.0):
            raise ValueError(f"ClientConfig.retry_jitter={self.retry_jitter!r}; use a value in [0, 1]")
        if self.max_message_bytes < 1024:
            raise ValueError(
                f"ClientConfig.max_message_bytes={self.max_message_bytes}; use at least 1024 "
                "(default 64 MiB)")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError(
                "ClientConfig: set both client_certificate and client_key for mutual TLS, or neither")
        uses_tls_files = (self.root_certificates, self.client_certificate, self.server_name_override)
        if not self.tls and any(v is not None for v in uses_tls_files):
            raise ValueError(
                "ClientConfig: root_certificates / client_certificate / server_name_override "
                "need tls=True; set tls=True or remove them")
        if self.token is not None and (not self.token.strip() or "\n" in self.token):
            raise ValueError("ClientConfig.token is blank or has a newline; pass the bare token")

    # -- derived values -------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata sent with every RPC (the bearer token when one is set)."""
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token.strip()}"),)

    def grpc_options(self) -> list[tuple[str, str | int]]:
        """Channel arguments: message size limits, user agent, TLS name override, extras."""
        from pairdots import __version__

        opts: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", f"pairdots-python/{__version__}"),
            # Retries are done by this client (it knows RetryInfo); keep gRPC's own off.
            ("grpc.enable_retries", 0),
        ]
        if self.server_name_override is not None:
            opts.append(("grpc.ssl_target_name_override", self.server_name_override))
        opts.extend(self.channel_options)
        return opts

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials read from the configured PEM files; None for plaintext."""
        if not self.tls:
            return None
        root = _read(self.root_certificates, "root_certificates") if self.root_certificates else None
        key = _read(self.client_key, "client_key") if self.client_key else None
        cert = (_read(self.client_certificate, "client_certificate")
                if self.client_certificate else None)
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=cert)

    def with_(self, **changes: Any) -> ClientConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- environment ----------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        """Build a config from environment variables; keyword `overrides` win over them.

        PAIRDOTS_ADDRESS, PAIRDOTS_TLS (1/true/yes/on or 0/false/no/off),
        PAIRDOTS_ROOT_CERTIFICATES, PAIRDOTS_CLIENT_CERTIFICATE, PAIRDOTS_CLIENT_KEY,
        PAIRDOTS_SERVER_NAME_OVERRIDE, PAIRDOTS_TOKEN, PAIRDOTS_MODEL, PAIRDOTS_TIMEOUT_S,
        PAIRDOTS_WAIT_TIMEOUT_S, PAIRDOTS_MAX_RETRIES, PAIRDOTS_MAX_MESSAGE_BYTES.
        Unset or empty variables keep the defaults.
        """
        source = os.environ if env is None else env
        spec: dict[str, tuple[str, type]] = {
            "PAIRDOTS_ADDRESS": ("address", str),
            "PAIRDOTS_TLS": ("tls", bool),
            "PAIRDOTS_ROOT_CERTIFICATES": ("root_certificates", str),
            "PAIRDOTS_CLIENT_CERTIFICATE": ("client_certificate", str),
            "PAIRDOTS_CLIENT_KEY": ("client_key", str),
            "PAIRDOTS_SERVER_NAME_OVERRIDE": ("server_name_override", str),
            "PAIRDOTS_TOKEN": ("token", str),
            "PAIRDOTS_MODEL": ("default_model", str),
            "PAIRDOTS_TIMEOUT_S": ("default_timeout_s", float),
            "PAIRDOTS_WAIT_TIMEOUT_S": ("wait_timeout_s", float),
            "PAIRDOTS_MAX_RETRIES": ("max_retries", int),
            "PAIRDOTS_MAX_MESSAGE_BYTES": ("max_message_bytes", int),
        }
        values: dict[str, Any] = {}
        for var, (name, kind) in spec.items():
            raw = source.get(var, "").strip()
            if not raw:
                continue
            if kind is bool:
                low = raw.lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(f"{var}={raw!r}; use 1/true/yes/on or 0/false/no/off")
                values[name] = low in _TRUE
            elif kind is str:
                values[name] = raw
            else:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"ClientConfig has no field(s) {unknown}; valid: {sorted(known)}")
        values.update(overrides)
        return cls(**values)
