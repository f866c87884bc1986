"""AttackRequest / RepairRequest → validated domain queries (perturb.attack, perturb.repair,
retrain), collecting every bad field into one InvalidArgument with field violations.

Limits come from config.JobLimits (examples per request, examples per test/error) and
config.ExplainLimits (text length, candidates). Label ranges are checked against the model,
so the caller resolves the model first (unknown model → NOT_FOUND).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.config import ExplainLimits, JobLimits
from pairdots_server.errors import InvalidArgument
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.model.retrain import MAX_EPOCHS, RetrainMode, RetrainSpec, check_save_as
from pairdots_server.perturb.attack import AttackMode, AttackQuery
from pairdots_server.perturb.repair import RepairMode, RepairQuery
from pairdots_server.rpc.convert import (
    SEARCH,
    TARGETS,
    TOKEN_SCORES,
    enum_table,
)
from pairdots_server.rpc.validation import Violations, solver_settings
from pairdots_server.storage.bundle import validate_bundle_name
from pairdots_server.storage.data import Example

ATTACK_MODES = enum_table(pb.AttackMode, "ATTACK_MODE_", AttackMode)
REPAIR_MODES = enum_table(pb.RepairMode, "REPAIR_MODE_", RepairMode,
                          unspecified=RepairMode.INFLUENCE)
RETRAIN_MODES = enum_table(pb.RetrainMode, "RETRAIN_MODE_", RetrainMode,
                           unspecified=RetrainMode.FULL)
DEFAULT_RANDOM_CANDIDATES = 5
MAX_RANDOM_CANDIDATES = 20


def _examples(
    v: Violations, field: str, items: Sequence[pb.LabeledText], n_labels: int,
    max_count: int, max_chars: int, *, required: bool = True,
) -> tuple[Example, ...]:
    if required and not items:
        v.add(field, "at least one labelled example is required")
    if len(items) > max_count:
        v.add(field, f"{len(items)} examples; at most {max_count} are accepted per request")
        return ()
    out: list[Example] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not item.text.strip():
            v.add(f"{where}.text", "must contain at least one non-whitespace character")
        elif len(item.text) > max_chars:
            v.add(f"{where}.text", f"has {len(item.text)} characters; at most {max_chars}")
        elif "\x00" in item.text:
            v.add(f"{where}.text", "must not contain NUL characters")
        if not 0 <= item.label < n_labels:
            v.add(f"{where}.label", f"{item.label} is not a label of the model; valid: "
                  f"0..{n_labels - 1}")
        out.append(Example(item.text, int(item.label)))
    return tuple(out)


def _influence(
    v: Violations, sal: pb.SaliencyOptions, inf: pb.InfluenceOptions, limits: ExplainLimits
) -> InfluenceSettings:
    target = v.enum("saliency.target_function", sal.target_function, TARGETS, "TargetFunction")
    score = v.enum("saliency.token_score", sal.token_score, TOKEN_SCORES, "TokenScoreMethod")
    solver = solver_settings(v, inf.solver, "influence.solver")
    use_index = v.enum("influence.candidate_search", inf.candidate_search, SEARCH,
                       "CandidateSearch")
    candidates = inf.candidate_count
    if not 0 <= candidates <= limits.max_candidates:
        v.add("influence.candidate_count", f"must be in 0..{limits.max_candidates}, got "
              f"{candidates}")
        candidates = 0
    if target is None or score is None:
        return InfluenceSettings()
    return InfluenceSettings(target, score, solver, use_index, candidates)  # type: ignore[arg-type]


def _retrain(
    v: Violations, r: pb.RetrainOptions, n_labels: int, jobs: JobLimits,
    limits: ExplainLimits,
) -> RetrainSpec | None:
    eval_examples = _examples(
        v, "retrain.eval_examples", r.eval_examples, n_labels, jobs.max_repair_examples,
        limits.max_text_chars, required=False,
    )
    mode = v.enum("retrain.mode", r.mode, RETRAIN_MODES, "RetrainMode")
    epochs = None
    if r.HasField("epochs"):
        if not 1 <= r.epochs <= MAX_EPOCHS:
            v.add("retrain.epochs", f"must be in 1..{MAX_EPOCHS}, got {r.epochs} (leave it "
                  "unset for the bundle's recipe)")
        else:
            epochs = int(r.epochs)
    save_as = r.save_as or None
    if save_as is not None:
        try:
            validate_bundle_name(save_as)
        except InvalidArgument:
            v.add("retrain.save_as", f"{save_as[:80]!r} is not a bundle name (1-63 lower-case "
                  "letters, digits, '.', '_', '-', starting with a letter or digit)")
            save_as = None
    if not r.enabled:
        if r.save_as or r.eval_examples or r.HasField("epochs"):
            v.add("retrain.enabled", "is false but other retrain options are set; set "
                  "enabled = true to retrain")
        return None
    if mode is None:
        return None
    return RetrainSpec(mode, epochs, eval_examples, save_as)  # type: ignore[arg-type]


MAX_WORDS = 10


def _max_words(v: Violations, req: pb.AttackRequest | pb.RepairRequest) -> int:
    """max_words m (unset: 1), a violation unless 1..MAX_WORDS."""
    m = req.max_words if req.HasField("max_words") else 1
    if not 1 <= m <= MAX_WORDS:
        v.add("max_words", f"must be in 1..{MAX_WORDS}, got {m}")
        return 1
    return int(m)


def attack_query(
    req: pb.AttackRequest, n_labels: int, jobs: JobLimits, limits: ExplainLimits,
    output_root: Path,
) -> tuple[AttackQuery, RetrainSpec | None]:
    """Validate an AttackRequest for a model with `n_labels` labels."""
    v = Violations()
    examples = _examples(v, "examples", req.examples, n_labels, jobs.max_attack_examples,
                         limits.max_text_chars)
    mode = ATTACK_MODES.get(req.mode)
    if mode is None:
        v.add("mode", "choose ATTACK_MODE_DEMOTE_SALIENT, _PROMOTE_WRONG, _COMBINED, "
              "_PREDICTION_MARGIN or _RANDOM"
              if req.mode == pb.ATTACK_MODE_UNSPECIFIED else f"{req.mode} is not an AttackMode")
    if not 1 <= req.examples_per_test <= jobs.max_examples_per_test:
        v.add("examples_per_test", f"must be in 1..{jobs.max_examples_per_test}, got "
              f"{req.examples_per_test}")
    t = req.random_candidates if req.HasField("random_candidates") else DEFAULT_RANDOM_CANDIDATES
    if not 0 <= t <= MAX_RANDOM_CANDIDATES:
        v.add("random_candidates", f"must be in 0..{MAX_RANDOM_CANDIDATES}, got {t}")
    m = _max_words(v, req)
    settings = _influence(v, req.saliency, req.influence, limits)
    retrain = _retrain(v, req.retrain, n_labels, jobs, limits)
    v.raise_if_any()
    if retrain is not None:
        check_save_as(output_root, retrain.save_as)  # AlreadyExists now, not after hours
    assert mode is not None
    query = AttackQuery(
        examples=examples, mode=mode, examples_per_test=int(req.examples_per_test),
        random_candidates=int(t), influence=settings, seed=int(req.seed), max_words=m,
        adaptive=bool(req.adaptive),
    )
    return query, retrain


def repair_query(
    req: pb.RepairRequest, n_labels: int, jobs: JobLimits, limits: ExplainLimits,
    output_root: Path,
) -> tuple[RepairQuery, RetrainSpec | None]:
    """Validate a RepairRequest for a model with `n_labels` labels."""
    v = Violations()
    examples = _examples(v, "examples", req.examples, n_labels, jobs.max_repair_examples,
                         limits.max_text_chars)
    mode = v.enum("mode", req.mode, REPAIR_MODES, "RepairMode")
    if not 1 <= req.examples_per_error <= jobs.max_examples_per_test:
        v.add("examples_per_error", f"must be in 1..{jobs.max_examples_per_test}, got "
              f"{req.examples_per_error}")
    m = _max_words(v, req)
    settings = _influence(v, req.saliency, req.influence, limits)
    retrain = _retrain(v, req.retrain, n_labels, jobs, limits)
    v.raise_if_any()
    if retrain is not None:
        check_save_as(output_root, retrain.save_as)  # AlreadyExists now, not after hours
    query = RepairQuery(
        examples=examples, examples_per_error=int(req.examples_per_error),
        mode=mode,  # type: ignore[arg-type]
        random_candidates=DEFAULT_RANDOM_CANDIDATES, influence=settings, seed=int(req.seed),
        max_words=m,
    )
    return query, retrain

