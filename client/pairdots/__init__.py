"""pairdots: typed Python client for the pairdots gRPC service ("Pair the Dots",
arXiv 2010.06943).

    from pairdots import ClientConfig, PairdotsClient
    with PairdotsClient(ClientConfig.from_env()) as client:
        expl = client.explain("the acting is wooden", model="minilm-sst2", top_words=2)
        for word in expl.target.salient_words:
            print(word.text, word.saliency, word.supporting[0].text)

Generated messages and stubs: ``from pairdots.v1 import pairdots_pb2, pairdots_pb2_grpc``.
HTML report: ``from pairdots.report import render_html, write_html``.
"""

from pairdots.aio import AsyncPairdotsClient
from pairdots.client import PairdotsClient, ProgressCallback
from pairdots.config import ClientConfig
from pairdots.errors import (
    AbortedError,
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PairdotsError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcCancelledError,
    UnauthenticatedError,
    UnavailableError,
    UnexpectedResponseError,
    UnimplementedError,
    UnknownError,
)
from pairdots.operations import (
    AttackOutcome,
    BatchItem,
    BatchResultsPage,
    Evaluation,
    ExampleEffect,
    ExplainBatchOutcome,
    JobProgress,
    OperationHandle,
    OperationOutcome,
    OperationPage,
    RepairOutcome,
    Substitution,
    TargetEffect,
    TrainingEdit,
)
from pairdots.options import (
    AttackMode,
    CandidateSearch,
    Curvature,
    EffectMeasurement,
    ExplanationRole,
    InfluenceOptions,
    JobKind,
    LabeledText,
    RepairMode,
    RetrainMode,
    RetrainOptions,
    SaliencyOptions,
    Solver,
    SolverOptions,
    SubstitutionRelation,
    TargetFunction,
    TokenInfluenceMethod,
    TokenScoreMethod,
    WordCandidates,
    WordMeasurement,
)
from pairdots.results import (
    Diagnostics,
    ExplainSettings,
    Explanation,
    InfluentialExample,
    LabelExplanation,
    ModelInfo,
    Prediction,
    PredictionInfluence,
    SalientWord,
    SolverDiagnostics,
    StageTiming,
    Word,
    WordInfluence,
)

__version__ = "0.1.0"

__all__ = [
    "AbortedError", "AlreadyExistsError", "AsyncPairdotsClient", "AttackMode", "AttackOutcome",
    "BatchItem", "BatchResultsPage", "CandidateSearch", "ClientConfig", "Curvature",
    "DataLossError", "DeadlineExceededError", "Diagnostics", "EffectMeasurement", "Evaluation",
    "ExampleEffect",
    "ExplainBatchOutcome", "ExplainSettings", "Explanation", "ExplanationRole", "FailedPreconditionError",
    "FieldViolation", "InfluenceOptions", "InfluentialExample", "InternalError",
    "InvalidArgumentError", "JobKind", "JobProgress", "LabelExplanation", "LabeledText", "ModelInfo",
    "NotFoundError", "OperationHandle", "OperationOutcome", "OperationPage", "OutOfRangeError",
    "PairdotsClient", "PairdotsError", "PermissionDeniedError", "Prediction",
    "PredictionInfluence", "ProgressCallback", "RepairMode", "RepairOutcome",
    "ResourceExhaustedError", "RetrainMode", "RetrainOptions", "RpcCancelledError",
    "SaliencyOptions", "SalientWord", "Solver", "SolverDiagnostics", "SolverOptions",
    "StageTiming", "Substitution", "SubstitutionRelation", "TargetEffect", "TargetFunction", "TokenInfluenceMethod", "TokenScoreMethod",
    "TrainingEdit", "UnauthenticatedError", "UnavailableError", "UnexpectedResponseError",
    "UnimplementedError", "UnknownError", "Word", "WordCandidates", "WordInfluence",
    "WordMeasurement", "__version__",
]
