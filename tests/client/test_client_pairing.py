"""Prediction-level influence, word contributions c_w and the new influence options: the
client's enums mirror the proto's, every proto field reaches the typed results, the options
reach the request, and the text rendering and HTML report show the new sections."""

from __future__ import annotations

import dataclasses
import enum
import re
from html.parser import HTMLParser

import pytest
from pairdots_client_fakes import (
    HOSTILE,
    Harness,
    example_proto,
    explain_response,
    model_proto,
    seconds,
)

import pairdots
from pairdots import (
    Explanation,
    InfluenceOptions,
    ModelInfo,
    PairdotsClient,
    PredictionInfluence,
    Solver,
    WordCandidates,
    WordMeasurement,
)
from pairdots.report import render_html
from pairdots.v1 import pairdots_pb2
from pairdots_server.cli.render import explanation_lines, print_explanation

# ---------------------------------------------------------------------------------------------
# Mirrors of the proto


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _client_enums() -> list[type[enum.IntEnum]]:
    return [v for v in vars(pairdots.options).values()
            if isinstance(v, type) and issubclass(v, enum.IntEnum) and v is not enum.IntEnum]


def test_every_client_enum_mirrors_its_proto_enum() -> None:
    enums = _client_enums()
    assert {e.__name__ for e in enums} >= {"Solver", "WordMeasurement", "WordCandidates"}
    for cls in enums:
        proto = pairdots_pb2.DESCRIPTOR.enum_types_by_name[cls.__name__]
        prefix = _upper_snake(cls.__name__) + "_"
        want = {v.name.removeprefix(prefix): v.number for v in proto.values}
        assert {m.name: int(m) for m in cls} == want, cls.__name__
    # and every proto enum has a client mirror
    assert set(pairdots_pb2.DESCRIPTOR.enum_types_by_name) == {e.__name__ for e in enums}
    assert Solver.EKFAC == pairdots_pb2.SOLVER_EKFAC == 5
    assert Solver.DIAGONAL == pairdots_pb2.SOLVER_DIAGONAL == 6
    assert Solver.IDENTITY == pairdots_pb2.SOLVER_IDENTITY == 7
    assert WordMeasurement.OCCLUSION == pairdots_pb2.WORD_MEASUREMENT_OCCLUSION
    assert WordCandidates.ALL == pairdots_pb2.WORD_CANDIDATES_ALL


#: typed result -> the message it is built from; every message field must be a dataclass field
_RESULTS = {
    "ModelInfo": "Model", "Prediction": "Prediction", "Word": "Word",
    "WordInfluence": "WordInfluence", "InfluentialExample": "InfluentialExample",
    "SolverDiagnostics": "SolverDiagnostics", "SalientWord": "SalientWord",
    "PredictionInfluence": "PredictionInfluence", "LabelExplanation": "LabelExplanation",
    "StageTiming": "StageTiming", "Diagnostics": "Diagnostics",
    "Explanation": "ExplainResponse", "ExplainSettings": "ExplainSettings",
}


@pytest.mark.parametrize("result,message", sorted(_RESULTS.items()))
def test_results_carry_every_proto_field(result: str, message: str) -> None:
    cls = getattr(pairdots, result)
    fields = {f.name for f in dataclasses.fields(cls)}
    proto_fields = set(pairdots_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name)
    assert proto_fields <= fields, proto_fields - fields


# ---------------------------------------------------------------------------------------------
# Options reach the proto


def test_influence_options_to_proto_new_fields() -> None:
    msg = InfluenceOptions(word_measurement=WordMeasurement.SALIENCY,
                           word_candidates=WordCandidates.ALL,
                           prediction_influence=False).to_proto()
    assert msg.word_measurement == pairdots_pb2.WORD_MEASUREMENT_SALIENCY
    assert msg.word_candidates == pairdots_pb2.WORD_CANDIDATES_ALL
    assert msg.HasField("prediction_influence") and msg.prediction_influence is False
    on = InfluenceOptions(prediction_influence=True).to_proto()
    assert on.HasField("prediction_influence") and on.prediction_influence is True
    unset = InfluenceOptions().to_proto()
    assert not unset.HasField("prediction_influence")
    assert unset.word_measurement == pairdots_pb2.WORD_MEASUREMENT_UNSPECIFIED
    assert unset.word_candidates == pairdots_pb2.WORD_CANDIDATES_UNSPECIFIED


def test_new_options_reach_the_explain_request(harness: Harness, make_config) -> None:
    infl = InfluenceOptions(word_measurement=WordMeasurement.OCCLUSION,
                            word_candidates=WordCandidates.CONTAINING,
                            prediction_influence=False)
    with PairdotsClient(make_config(harness.address)) as client:
        client.explain("text", influence=infl)
        client.explain("text", influence=InfluenceOptions(word_candidates=WordCandidates.ALL))
    req, default = harness.service.requests["Explain"]
    assert req.influence.word_measurement == pairdots_pb2.WORD_MEASUREMENT_OCCLUSION
    assert req.influence.word_candidates == pairdots_pb2.WORD_CANDIDATES_CONTAINING
    assert req.influence.HasField("prediction_influence")
    assert not req.influence.prediction_influence
    assert default.influence.word_candidates == pairdots_pb2.WORD_CANDIDATES_ALL
    assert not default.influence.HasField("prediction_influence")


def test_model_info_has_ekfac_and_diagonal() -> None:
    msg = model_proto()
    msg.has_ekfac, msg.default_solver = True, pairdots_pb2.SOLVER_EKFAC
    m = ModelInfo.from_proto(msg)
    assert m.has_ekfac and not m.has_diagonal and m.default_solver is Solver.EKFAC
    msg.has_diagonal = True
    assert ModelInfo.from_proto(msg).has_diagonal


# ---------------------------------------------------------------------------------------------
# A hand-built answer with the new fields

#: c_w of "a gripping , funny film": signs deliberately differ from the saliency's
#: (0.5, 0.2, -0.1, -0.4, -0.7) where it matters, so the colours must follow c_w.
CONTRIB = [-0.25, 1.5, 0.0, 0.75, -0.5]


def paired_response() -> pairdots_pb2.ExplainResponse:
    msg = explain_response()
    target = msg.explanations[0]
    target.word_contribution.extend(CONTRIB)
    sw = target.salient_words[0]
    sw.contribution, sw.containing_example_count = CONTRIB[0], 42
    target.prediction.CopyFrom(pairdots_pb2.PredictionInfluence(
        margin=2.5,
        supporting=[example_proto(21, "a riveting tale", 0.875, 1)],
        opposing=[example_proto(22, "boring " + HOSTILE, -0.375, 0, label=0)],
        solver=pairdots_pb2.SolverDiagnostics(
            solver=pairdots_pb2.SOLVER_EKFAC, curvature=pairdots_pb2.CURVATURE_GAUSS_NEWTON,
            iteration_count=0, norm=1.5, effective_damping=0.1, converged=True,
            duration=seconds(0.25)),
        scored_candidate_count=77))
    # the settings that ran: c_w as the word measurement, a signed token score
    msg.settings.CopyFrom(pairdots_pb2.ExplainSettings(
        target_function=pairdots_pb2.TARGET_FUNCTION_LOG_PROBABILITY,
        token_score=pairdots_pb2.TOKEN_SCORE_METHOD_GRADIENT_TIMES_INPUT,
        word_measurement=pairdots_pb2.WORD_MEASUREMENT_OCCLUSION,
        word_candidates=pairdots_pb2.WORD_CANDIDATES_CONTAINING,
        solver=pairdots_pb2.SOLVER_EKFAC, curvature=pairdots_pb2.CURVATURE_GAUSS_NEWTON,
        candidate_search=pairdots_pb2.CANDIDATE_SEARCH_EXHAUSTIVE,
        token_influence=pairdots_pb2.TOKEN_INFLUENCE_METHOD_EXACT, prediction_influence=True))
    return msg


def test_conversion_of_the_new_fields() -> None:
    expl = Explanation.from_proto(paired_response())
    target, gold = expl.target, expl.gold
    assert target is not None and gold is not None
    assert target.word_contribution == tuple(CONTRIB)
    p = target.prediction
    assert isinstance(p, PredictionInfluence)
    assert p.margin == 2.5 and p.candidates_scored == 77
    assert [e.train_index for e in p.supporting] == [21]
    assert [e.train_index for e in p.opposing] == [22]
    assert p.supporting[0].responsible is not None
    assert p.supporting[0].responsible.text == "riveting"
    assert p.solver is not None and p.solver.solver is Solver.EKFAC
    sw = target.salient_words[0]
    assert sw.contribution == -0.25 and sw.containing_examples == 42
    # unset on the gold label: no contributions, no prediction-level influence
    assert gold.word_contribution == () and gold.prediction is None
    assert gold.salient_words[0].contribution == 0.0


def test_text_rendering_words_prediction_then_salient_words(capsys) -> None:
    expl = Explanation.from_proto(paired_response())
    print_explanation(expl)
    out = capsys.readouterr().out
    assert out.splitlines() == explanation_lines(expl)
    target_part = out.split("== gold label 'negative'")[0]
    pred = target_part.index("training examples that support / oppose the prediction")
    assert target_part.index("word saliency") < pred < target_part.index("salient word 'a'")
    assert "m_y = +2.5000" in target_part and "77 scored" in target_part
    assert "EKFAC" in target_part
    sup = target_part.index("supporting the prediction 'positive'")
    opp = target_part.index("opposing the prediction 'positive'")
    assert sup < target_part.index("#21") < opp < target_part.index("#22")
    assert "I(z, m_y) = +8.750e-01  label 'positive'  a riveting tale" in target_part
    assert "[responsible word: 'riveting'" in target_part
    assert "I(z, m_y) = -3.750e-01  label 'negative'" in target_part
    # the salient word: c_w, training examples containing it, its examples
    assert ("salient word 'a' (contribution c_w = -0.2500; saliency +0.5000; "
            "in 42 training examples;") in target_part
    assert "gripping:+1.500" in target_part and "funny:+0.750" in target_part
    assert "I(z, c_w) = +2.500e-01  label 'positive'  truly gripping story" in target_part
    assert "[responsible word: 'gripping'" in target_part
    # gold: no prediction-level section, a None responsible word does not break it
    gold_part = out.split("== gold label 'negative'")[1]
    assert gold_part.startswith(" (error analysis")  # named by its label, not its role number
    assert "support / oppose the prediction" not in gold_part
    assert "[no responsible word]" in gold_part and "(GOLD)" not in gold_part


# ---------------------------------------------------------------------------------------------
# HTML report


class _Tokens(HTMLParser):
    """Background style and visible text of every heatmap token (class "tok")."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tokens: list[tuple[str, str]] = []
        self.depth = 0
        self.text: list[str] = []
        self.style = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self.depth:
            self.depth += 1
        elif tag == "span" and (a.get("class") or "").split()[:1] == ["tok"]:
            self.depth, self.text, self.style = 1, [], a.get("style") or ""

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1
            if not self.depth:
                self.tokens.append((self.style, "".join(self.text)))

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.text.append(data)


def _label_section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    end = doc.find("<h2", start + 1)
    return doc[start:end if end >= 0 else len(doc)]


def _tokens(section: str) -> list[tuple[str, str]]:
    p = _Tokens()
    p.feed(section)
    return p.tokens


BLUE, RED = "rgba(33,102,172,", "rgba(178,24,43,"


def test_report_words_then_prediction_section_and_colours_follow_c_w() -> None:
    doc = render_html(Explanation.from_proto(paired_response()))
    target = _label_section(doc, "Target label: positive")
    pred = target.index("Training examples that support / oppose the prediction positive")
    assert target.index('class="sentence"') < pred < target.index("<h3>1. “a”")
    assert "z_c = <b>+2.5</b> of positive" in target and "77 training examples scored" in target
    assert "train #21" in target and "I(z, m_y) = <b>+0.875</b>" in target
    assert "train #22" in target and "I(z, m_y) = <b>-0.375</b>" in target
    assert "responsible word ◆<b>riveting</b>" in target
    assert target.index('class="sentence"') < target.index("train #21") < target.index("train #22")
    # legend and a labelled diverging colour bar say what the colours mean
    assert "blue ▲ raises positive, red ▼ lowers it" in target
    assert '<figure class="colour-bar" data-scale="signed">' in target
    assert "lowers positive" in target and "raises positive" in target
    assert "unsigned" not in target
    # colours follow the sign of c_w (not of the saliency), numbers are visible text
    toks = _tokens(target)
    assert [t for _, t in toks] == ["a▼-0.25", "gripping▲+1.5", ",·+0", "funny▲+0.75",
                                    "film▼-0.5"]
    styles = [s for s, _ in toks]
    assert RED in styles[0] and BLUE in styles[1] and "transparent" in styles[2]
    assert BLUE in styles[3] and RED in styles[4]
    assert 'data-contribution="+1.5"' in target
    # the salient word: c_w and the training examples containing it
    assert "contribution c_w = -0.25 ▼" in target and "in 42 training examples" in target
    assert "I(z, c_w) = <b>+0.25</b>" in target


def test_report_falls_back_to_saliency_without_contributions() -> None:
    doc = render_html(Explanation.from_proto(paired_response()))
    gold = _label_section(doc, "Gold label: negative")
    # signed saliency (-0.5 .. +0.7): coloured by saliency, not called unsigned
    toks = _tokens(gold)
    assert RED in toks[0][0] and BLUE in toks[-1][0] and toks[-1][1] == "film▲+0.7"
    assert "unsigned" not in gold and "Prediction-level influence not requested" in gold
    # nonnegative saliency everywhere: the legend says the score is unsigned
    msg = explain_response()
    for lab in msg.explanations:
        lab.word_saliency[:] = [abs(s) for s in lab.word_saliency]
    doc = render_html(Explanation.from_proto(msg))
    target = _label_section(doc, "Target label: positive")
    assert "The score is unsigned" in target
    assert BLUE not in "".join(s for s, _ in _tokens(target))
    assert RED not in "".join(s for s, _ in _tokens(target))
