"""ClientConfig validation and environment parsing; RetryPolicy arithmetic; error parsing."""

from __future__ import annotations

import random

import grpc
import pytest
from google.rpc import code_pb2
from pairdots_client_fakes import rich_status

from pairdots import (
    ClientConfig,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    UnknownError,
)
from pairdots.errors import error_from_status
from pairdots.retry import RetryPolicy


def test_defaults_and_metadata() -> None:
    cfg = ClientConfig()
    assert cfg.address == "localhost:50051" and not cfg.tls and cfg.max_retries == 3
    assert cfg.retry_initial_backoff_s == 0.2 and cfg.retry_max_backoff_s == 5.0
    assert cfg.metadata() == ()
    assert cfg.channel_credentials() is None
    tok = ClientConfig(token="abc")
    assert tok.metadata() == (("authorization", "Bearer abc"),)
    assert "abc" not in repr(tok)
    opts = dict(ClientConfig(max_message_bytes=2048).grpc_options())
    assert opts["grpc.max_receive_message_length"] == 2048


def test_from_env() -> None:
    env = {"PAIRDOTS_ADDRESS": "svc:443", "PAIRDOTS_TLS": "yes", "PAIRDOTS_TOKEN": "t0k",
           "PAIRDOTS_TIMEOUT_S": "12.5", "PAIRDOTS_MAX_RETRIES": "0", "PAIRDOTS_MODEL": "m",
           "PAIRDOTS_ROOT_CERTIFICATES": ""}
    cfg = ClientConfig.from_env(env, poll_interval_s=2.0)
    assert (cfg.address, cfg.tls, cfg.token, cfg.default_timeout_s, cfg.max_retries,
            cfg.default_model, cfg.poll_interval_s, cfg.root_certificates) == (
        "svc:443", True, "t0k", 12.5, 0, "m", 2.0, None)
    assert ClientConfig.from_env({}) == ClientConfig()


@pytest.mark.parametrize(("env", "match"), [
    ({"PAIRDOTS_TLS": "maybe"}, "PAIRDOTS_TLS"),
    ({"PAIRDOTS_MAX_RETRIES": "three"}, "PAIRDOTS_MAX_RETRIES"),
    ({"PAIRDOTS_TIMEOUT_S": "-1"}, "default_timeout_s"),
])
def test_from_env_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClientConfig.from_env(env)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"address": " "}, "address"),
    ({"default_timeout_s": 0}, "default_timeout_s"),
    ({"max_retries": -1}, "max_retries"),
    ({"retry_initial_backoff_s": 2.0, "retry_max_backoff_s": 1.0}, "retry_max_backoff_s"),
    ({"retry_backoff_multiplier": 0.5}, "multiplier"),
    ({"retry_jitter": 1.5}, "retry_jitter"),
    ({"max_message_bytes": 10}, "max_message_bytes"),
    ({"tls": True, "client_certificate": "c.pem"}, "client_key"),
    ({"root_certificates": "ca.pem"}, "tls=True"),
    ({"token": "a\nb"}, "token"),
])
def test_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClientConfig(**kwargs)  # type: ignore[arg-type]


def test_tls_credentials_read_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="root_certificates"):
        ClientConfig(tls=True, root_certificates=str(tmp_path / "missing.pem")).channel_credentials()
    assert isinstance(ClientConfig(tls=True).channel_credentials(), grpc.ChannelCredentials)


def test_backoff_sequence_exact_without_jitter() -> None:
    p = RetryPolicy(max_retries=10, initial_backoff_s=0.2, max_backoff_s=5.0, multiplier=2.0,
                    jitter=0.0)
    assert [p.backoff(k) for k in range(7)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_backoff_jitter_bounds() -> None:
    p = RetryPolicy(jitter=0.25, rng=random.Random(0))
    for k in range(6):
        base = min(5.0, 0.2 * 2.0 ** k)
        for _ in range(50):
            assert 0.75 * base - 1e-12 <= p.backoff(k) <= base


def test_retry_decisions() -> None:
    p = RetryPolicy(max_retries=2, jitter=0.0)
    unavailable = UnavailableError("x")
    assert p.delay(unavailable, 0, 10.0) == pytest.approx(0.2)
    assert p.delay(unavailable, 1, 10.0) == pytest.approx(0.4)
    assert p.delay(unavailable, 2, 10.0) is None          # max_retries reached
    assert p.delay(unavailable, 0, 0.1) is None           # would pass the deadline
    assert p.delay(InvalidArgumentError("x"), 0, 10.0) is None
    assert p.delay(UnknownError("x"), 0, 10.0) is None
    hinted = ResourceExhaustedError("x", retry_after_s=7.0)
    assert p.delay(hinted, 0, 10.0) == 7.0                # RetryInfo beats backoff and cap
    assert p.delay(hinted, 0, 6.0) is None


def test_error_from_status_details() -> None:
    st = rich_status(code_pb2.INVALID_ARGUMENT, "bad", reason="R",
                     violations=(("a", "x"), ("b.c", "y")), retry_delay_s=1.5)
    err = error_from_status(st)
    assert isinstance(err, InvalidArgumentError) and err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.field_violations] == ["a", "b.c"]
    assert err.retry_after_s == pytest.approx(1.5) and err.reason == "R"
    assert len(err.details) == 3
    unknown = error_from_status(rich_status(999, "future code"))
    assert isinstance(unknown, UnknownError) and unknown.message == "future code"
