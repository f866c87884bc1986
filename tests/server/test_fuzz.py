"""Property-based fuzzing of a real server: ≥ 1,000 random ExplainRequest / GetModel calls
through the raw generated stub never get UNKNOWN or INTERNAL (issue 6: "no handler may leak
UNKNOWN/INTERNAL for anything a caller can cause"), and the server stays SERVING.

Requests are random in every field: text (unicode, empty, whitespace, NUL, past the 10,000
character limit), labels and counts (any int32, incl. out of range), enum values (any int32,
incl. unknown ones), solver settings (NaN, ±inf, negative, zero, huge), model names (path-like,
upper case, long). Valid requests are kept cheap: top_words is 0 or out of range and
word_positions is empty or contains an invalid position, so no influence solve ever runs and
the whole test stays well under a minute on one core.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pdserver_util import RunningServer

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg

N_EXAMPLES = 1000
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# What a caller can legitimately get back for a random request (proto / README contract).
DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
MAX_TOP_WORDS = 32

MODEL_NAMES = st.one_of(
    st.just("tiny"),
    st.sampled_from([
        "", "TINY", "tiny/", "./tiny", "../tiny", "tiny/../tiny", "/etc/passwd", "..", ".",
        "~/.ssh/id_rsa", "C:\\Windows\\x", "tiny\x00", "tiny%2f..", "file:///tmp/x", " tiny",
        "a" * 300, "tïny", "nope",
    ]),
    st.text(max_size=40),
    st.from_regex(r"\A(\.\./|/|[a-z0-9_-]{1,12}/){1,4}[a-z0-9._-]{0,12}\Z"),
)

TEXTS = st.one_of(
    st.text(max_size=200),  # any unicode (no surrogates: proto strings are UTF-8)
    st.sampled_from(["", " ", "\t\n ", "a\x00b", "i loved it !", "\u200b", "🙂" * 50]),
    st.builds(lambda word, n: (word + " ") * n,  # around and past max_text_chars (10,000)
              st.sampled_from(["good", "x", "é", "🙂"]), st.integers(2_400, 6_000)),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30).map(
        lambda s: s * 500),
)

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, float("nan"), float("inf"),
                     float("-inf"), 0.5, 1.0]),
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maybe(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """None (leave the optional field unset) or a value."""
    return st.one_of(st.none(), strategy)


@st.composite
def solver_options(draw: st.DrawFn, valid: bool) -> pb.SolverOptions:
    """Valid settings (any solver: none runs with top_words 0) or anything at all."""
    enum = (lambda hi: st.integers(0, hi)) if valid else (
        lambda hi: st.one_of(st.integers(0, hi + 1), INT32))
    positive = st.floats(1e-6, 1e6) if valid else FLOATS
    s = pb.SolverOptions(solver=draw(enum(4)), curvature=draw(enum(2)))
    for name in ("damping", "scale"):
        value = draw(_maybe(positive))
        if value is not None:
            setattr(s, name, value)
    tolerance = draw(_maybe(st.floats(1e-9, 0.99) if valid else FLOATS))
    if tolerance is not None:
        s.tolerance = tolerance
    for name, hi in (("max_iterations", 100_000), ("repeats", 16), ("batch_size", 1024)):
        value = draw(_maybe(st.integers(1, hi) if valid else INT32))
        if value is not None:
            setattr(s, name, value)
    seed = draw(_maybe(st.integers(0, 2**64 - 1)))
    if seed is not None:
        s.seed = seed
    return s


def _bad_positions(draw: st.DrawFn) -> list[int]:
    """At least one invalid position (negative, duplicate or far past the end): any valid
    list would start an influence solve."""
    positions = draw(st.lists(st.integers(0, 40), max_size=40))
    bad = draw(st.one_of(st.integers(-(2**31), -1), st.integers(100_000, 2**31 - 1),
                         st.sampled_from(positions or [-1])))
    positions.insert(draw(st.integers(0, len(positions))), bad)
    return positions


VALID_TEXT = st.text(min_size=1, max_size=200).filter(lambda t: t.strip() and "\x00" not in t)
LABEL = st.one_of(st.integers(-2, 3), INT32)
# Per field: (a valid value, any value). A draw is `valid` (all fields valid), `one_bad` (one
# field from its any-strategy) or `chaos` (every field from its any-strategy).
FIELDS: dict[str, tuple[st.SearchStrategy[object], st.SearchStrategy[object]]] = {
    "model": (st.just("tiny"), MODEL_NAMES),
    "text": (VALID_TEXT, TEXTS),
    "top_words": (st.just(0), st.one_of(st.integers(-(2**31), -1),
                                        st.integers(MAX_TOP_WORDS + 1, 2**31 - 1))),
    "target_label": (_maybe(st.integers(0, 1)), _maybe(LABEL)),
    "gold_label": (_maybe(st.integers(0, 1)), _maybe(LABEL)),
    "examples_per_word": (st.integers(0, 100), st.one_of(st.integers(-2, 102), INT32)),
    "target_function": (st.integers(0, 3), st.one_of(st.integers(0, 4), INT32)),
    "token_score": (st.integers(0, 3), st.one_of(st.integers(0, 4), INT32)),
    "solver": (solver_options(valid=True), solver_options(valid=False)),
    "candidate_search": (st.integers(0, 2), st.one_of(st.integers(0, 3), INT32)),
    "candidates": (st.integers(0, 20_000), st.one_of(st.integers(-1, 20_001), INT32)),
    "token_influence": (st.integers(0, 4), st.one_of(st.integers(0, 5), INT32)),
}


@st.composite
def explain_requests(draw: st.DrawFn) -> pb.ExplainRequest:
    mode = draw(st.sampled_from(["valid", "one_bad", "chaos"]))
    bad = {draw(st.sampled_from([*FIELDS, "word_positions"]))} if mode == "one_bad" else set()
    if mode == "chaos":
        bad = {*FIELDS, "word_positions"}
    v = {name: draw(pair[1] if name in bad else pair[0]) for name, pair in FIELDS.items()}
    req = pb.ExplainRequest(model=v["model"], text=v["text"], top_words=v["top_words"],
                            examples_per_word=v["examples_per_word"])
    for name in ("target_label", "gold_label"):
        if v[name] is not None:
            setattr(req, name, v[name])
    if "word_positions" in bad and draw(st.booleans()):
        req.word_positions.extend(_bad_positions(draw))
    req.saliency.target_function = v["target_function"]
    req.saliency.token_score = v["token_score"]
    req.influence.solver.CopyFrom(v["solver"])
    req.influence.candidate_search = v["candidate_search"]
    req.influence.candidate_count = v["candidates"]
    req.influence.token_influence = v["token_influence"]
    return req


REQUESTS = st.one_of(
    explain_requests(),
    st.builds(lambda name: pb.GetModelRequest(name=name), MODEL_NAMES),
)


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _call(stub: pbg.PairdotsServiceStub, req: pb.ExplainRequest | pb.GetModelRequest
          ) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(req, pb.GetModelRequest):
            stub.GetModel(req, timeout=60)
        else:
            stub.Explain(req, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_random_requests_never_leak_unknown_or_internal(server: RunningServer,
                                                         channel: grpc.Channel) -> None:
    stub = pbg.PairdotsServiceStub(channel)
    codes: Counter[str] = Counter()

    @settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(REQUESTS)
    def check(req: pb.ExplainRequest | pb.GetModelRequest) -> None:
        code, details = _call(stub, req)
        codes[code.name] += 1
        assert code not in FORBIDDEN, f"{code.name}: {details}\nrequest: {req!r:.2000}"
        assert code in DOCUMENTED, f"undocumented {code.name}: {details}"
        if code != grpc.StatusCode.OK:
            assert details, f"{code.name} without a message"
        model = req.name if isinstance(req, pb.GetModelRequest) else req.model
        if model != "tiny":  # only the served name may succeed
            assert code != grpc.StatusCode.OK, f"model {model!r} answered OK"
        if isinstance(req, pb.ExplainRequest) and not req.text.strip():
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)

    check()
    total = sum(codes.values())
    print(f"fuzz: {total} requests, codes {dict(codes)}")
    assert total >= N_EXAMPLES, codes
    # The fuzzer reached both successful and refused paths.
    assert codes["OK"] >= 100 and codes["INVALID_ARGUMENT"] >= 100, codes

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    ok = stub.Explain(pb.ExplainRequest(model="tiny", text="i loved it !", top_words=0),
                      timeout=60)
    assert ok.prediction.label_name in ("negative", "positive")
