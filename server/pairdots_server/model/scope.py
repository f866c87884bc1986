"""The influence scope: which parameters θ the influence functions differentiate.

A `ScopeSpec` (kind + n + pattern, stored in the bundle manifest) selects parameter names of a
model; how encoder layers and the classification head are named is a `ParameterLayout`
(BERT_LAYOUT: ``encoder.layer.<i>.``, ``pooler.*``, ``classifier.*``), so another model family
is one more layout, not a change here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import InvalidArgument

if TYPE_CHECKING:
    import torch


class ScopeKind(str, enum.Enum):
    DEFAULT = "default"  # the last encoder layer + pooler + classifier (= last_n with n=1)
    HEAD = "head"  # pooler + classifier only
    LAST_N = "last_n"  # the n last encoder layers + pooler + classifier
    ALL = "all"  # every parameter except the word-embedding matrix
    PATTERN = "pattern"  # every parameter whose name matches the regex (re.search)


SCOPE_KINDS = tuple(k.value for k in ScopeKind)


@dataclass(frozen=True)
class ParameterLayout:
    """How a model family names its encoder layers (`layer`: group 1 = layer index) and its
    head (pooler / classifier prefixes)."""

    layer: re.Pattern[str]
    head_prefixes: tuple[str, ...]
    classifier_prefix: str

    def is_head(self, name: str) -> bool:
        """Pooler and classifier parameters (at the top level or nested)."""
        return name.startswith(self.head_prefixes) or any(
            f".{p}" in name for p in self.head_prefixes
        )

    def is_classifier(self, name: str) -> bool:
        p = self.classifier_prefix
        return name.startswith(p) or f".{p}" in name


BERT_LAYOUT = ParameterLayout(
    layer=re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\."),
    head_prefixes=("classifier.", "pooler."),
    classifier_prefix="classifier.",
)




def word_embedding_names(model: torch.nn.Module) -> set[str]:
    """Names of the input (word) embedding matrix of an HF model (empty for other modules).

    It is never in scope: `logits_fn` takes the word embeddings as its input, so no gradient
    reaches the lookup table (it would be a silent block of zeros)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    weight = getattr(emb, "weight", None)
    if weight is None:
        return set()
    return {nm for nm, p in model.named_parameters() if p is weight}


@dataclass(frozen=True)
class ScopeSpec:
    """Which parameters θ the influence functions differentiate (Eq. 4-8 take ∇θ over these).

    kind:
      * ``"default"`` - the last encoder layer + pooler + classifier (= ``last_n`` with n=1)
      * ``"head"``    - pooler + classifier only
      * ``"last_n"``  - the ``n`` last encoder layers + pooler + classifier
      * ``"all"``     - every parameter except the word-embedding matrix (no gradient reaches it)
      * ``"pattern"`` - every parameter whose name matches the regex ``pattern`` (re.search)
    """

    kind: ScopeKind = ScopeKind.DEFAULT  # a ScopeKind or its value ("default", "head", ...)
    n: int = 1
    pattern: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ScopeKind):
            if self.kind not in SCOPE_KINDS:
                raise InvalidArgument.for_field(
                    "scope.kind",
                    f"unknown scope kind {self.kind!r}; use one of {', '.join(SCOPE_KINDS)}",
                )
            object.__setattr__(self, "kind", ScopeKind(self.kind))
        if self.kind is ScopeKind.LAST_N and (not isinstance(self.n, int) or self.n < 1):
            raise InvalidArgument.for_field(
                "scope.n", f"last_n needs n >= 1 encoder layers, got {self.n!r}"
            )
        if self.kind is ScopeKind.PATTERN:
            if not self.pattern:
                raise InvalidArgument.for_field(
                    "scope.pattern", "scope kind 'pattern' needs a non-empty regular expression"
                )
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise InvalidArgument.for_field(
                    "scope.pattern", f"not a valid regular expression ({exc}): {self.pattern!r}"
                ) from exc

    # -- selection ---------------------------------------------------------------------------

    def select(self, model: torch.nn.Module, layout: ParameterLayout | None = None) -> list[str]:
        """Names of the parameters in scope, in ``model.named_parameters()`` order.

        `layout` says how encoder layers and the head are named (default BERT_LAYOUT). Raises
        InvalidArgument when the model does not follow it (no encoder layers or no classifier)
        for the layer-based kinds, or when nothing matches.
        """
        layout = layout or BERT_LAYOUT
        names = [name for name, _ in model.named_parameters()]
        lookup = word_embedding_names(model)
        if self.kind is ScopeKind.ALL:
            chosen = [nm for nm in names if nm not in lookup]
        elif self.kind is ScopeKind.PATTERN:
            rx = re.compile(self.pattern)
            chosen = [nm for nm in names if rx.search(nm) and nm not in lookup]
        else:
            head = [nm for nm in names if layout.is_head(nm)]
            if not any(layout.is_classifier(nm) for nm in head):
                raise InvalidArgument.for_field(
                    "scope.kind",
                    f"scope {self.kind!r} expects a BERT-family model with a 'classifier' head; "
                    f"this model ({type(model).__name__}) has none - use scope kind 'pattern' "
                    "or 'all'",
                )
            if self.kind is ScopeKind.HEAD:
                keep_layers: set[int] = set()
            else:
                layer_ids = sorted({int(m.group(1)) for nm in names if (m := layout.layer.search(nm))})
                if not layer_ids:
                    raise InvalidArgument.for_field(
                        "scope.kind",
                        f"scope {self.kind!r} expects BERT-style 'encoder.layer.<i>.' parameters; "
                        f"{type(model).__name__} has none - use scope kind 'head', 'pattern' or "
                        "'all'",
                    )
                n = 1 if self.kind is ScopeKind.DEFAULT else self.n
                if n > len(layer_ids):
                    raise InvalidArgument.for_field(
                        "scope.n", f"the model has {len(layer_ids)} encoder layers, asked for {n}"
                    )
                keep_layers = set(layer_ids[-n:])
            chosen = []
            for nm in names:
                m = layout.layer.search(nm)
                if (m and int(m.group(1)) in keep_layers) or nm in head:
                    chosen.append(nm)
        if not chosen:
            raise InvalidArgument.for_field(
                "scope", f"{self.describe()} selects no parameter of {type(model).__name__}"
            )
        return chosen

    def describe(self) -> str:
        """Human-readable description for manifests and answers."""
        if self.kind is ScopeKind.DEFAULT:
            return "default (last encoder layer + pooler + classifier)"
        if self.kind is ScopeKind.HEAD:
            return "head (pooler + classifier)"
        if self.kind is ScopeKind.LAST_N:
            return f"last_n={self.n} (last {self.n} encoder layers + pooler + classifier)"
        if self.kind is ScopeKind.ALL:
            return "all parameters except the word-embedding matrix"
        return f"pattern {self.pattern!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "n": self.n, "pattern": self.pattern}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScopeSpec:
        unknown = set(d) - {"kind", "n", "pattern"}
        if unknown:
            raise InvalidArgument.for_field(
                "scope", f"unknown keys {sorted(unknown)}; allowed: kind, n, pattern"
            )
        return cls(
            kind=str(d.get("kind", "default")),  # type: ignore[arg-type]  # coerced to ScopeKind
            n=int(d.get("n", 1)),
            pattern=str(d.get("pattern", "")),
        )
