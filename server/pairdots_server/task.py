"""The model adapter (kronfluence-style Task): everything model-specific lives here.

A `Task` wraps a HuggingFace ``AutoModelForSequenceClassification`` and its fast tokenizer and
exposes the few functions the math in ``core/`` needs:

* ``embed(input_ids) -> E``                      word embeddings e_t (paper Eq. 1-2 differentiate
                                                 the class score S_y(E) w.r.t. these)
* ``logits_fn(params, E, mask) -> logits``       the classifier as a pure function of the influence
                                                 scope parameters θ_scope and the embeddings E, so
                                                 that ∇θ, ∇θ∇E (Eq. 5) and H·v (App. B) are taken
                                                 with torch.func / autograd
* ``loss(logits, y) -> L``                       per-example L(z, θ) = -log p(y|x; θ) (Eq. 4)

Parameter convention: every model parameter is kept at ``requires_grad=False``; the core
differentiates w.r.t. the tensors *it passes* to ``logits_fn`` (``functional_call`` swaps them
in). ``train.fine_tune`` switches gradients on for the duration of training only.

Attention is always loaded "eager": the fused SDPA kernels have no double backward.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SCOPE_KINDS = ("default", "head", "last_n", "all", "pattern")

_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' warnings and progress bars inside the block (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Influence scope
# --------------------------------------------------------------------------------------------


def _word_embedding_names(model: torch.nn.Module) -> set[str]:
    """Names of the input (word) embedding matrix of an HF model (empty for other modules)."""
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
      * ``"all"``     - every parameter except the word-embedding matrix (position and
                          token-type embeddings included)
      * ``"pattern"`` - every parameter whose name matches the regex ``pattern`` (re.search),
                        except the word-embedding matrix

    The word-embedding matrix is never in scope: ``logits_fn`` takes the word embeddings as
    its input, so no gradient reaches the lookup table (it would be a silent block of zeros).
    """

    kind: str = "default"
    n: int = 1
    pattern: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SCOPE_KINDS:
            raise InvalidArgument.for_field(
                "scope.kind",
                f"unknown scope kind {self.kind!r}; use one of {', '.join(SCOPE_KINDS)}",
            )
        if self.kind == "last_n" and (not isinstance(self.n, int) or self.n < 1):
            raise InvalidArgument.for_field(
                "scope.n", f"last_n needs n >= 1 encoder layers, got {self.n!r}"
            )
        if self.kind == "pattern":
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

    def select(self, model: torch.nn.Module) -> list[str]:
        """Names of the parameters in scope, in ``model.named_parameters()`` order.

        Raises InvalidArgument when the layout is not BERT-like (no ``encoder.layer.<i>.``
        parameters or no classifier) for the layer-based kinds, or when nothing matches.
        """
        names = [name for name, _ in model.named_parameters()]
        lookup = _word_embedding_names(model)
        if self.kind == "all":
            chosen = [nm for nm in names if nm not in lookup]
        elif self.kind == "pattern":
            rx = re.compile(self.pattern)
            chosen = [nm for nm in names if rx.search(nm) and nm not in lookup]
        else:
            head = [nm for nm in names if _is_head(nm)]
            if not any(nm.startswith("classifier.") or ".classifier." in nm for nm in head):
                raise InvalidArgument.for_field(
                    "scope.kind",
                    f"scope {self.kind!r} expects a BERT-family model with a 'classifier' head; "
                    f"this model ({type(model).__name__}) has none - use scope kind 'pattern' "
                    "or 'all'",
                )
            if self.kind == "head":
                keep_layers: set[int] = set()
            else:
                layer_ids = sorted({int(m.group(1)) for nm in names if (m := _LAYER_RE.search(nm))})
                if not layer_ids:
                    raise InvalidArgument.for_field(
                        "scope.kind",
                        f"scope {self.kind!r} expects BERT-style 'encoder.layer.<i>.' parameters; "
                        f"{type(model).__name__} has none - use scope kind 'head', 'pattern' or "
                        "'all'",
                    )
                n = 1 if self.kind == "default" else self.n
                if n > len(layer_ids):
                    raise InvalidArgument.for_field(
                        "scope.n", f"the model has {len(layer_ids)} encoder layers, asked for {n}"
                    )
                keep_layers = set(layer_ids[-n:])
            chosen = []
            for nm in names:
                m = _LAYER_RE.search(nm)
                if (m and int(m.group(1)) in keep_layers) or nm in head:
                    chosen.append(nm)
        if not chosen:
            raise InvalidArgument.for_field(
                "scope", f"{self.describe()} selects no parameter of {type(model).__name__}"
            )
        return chosen

    def describe(self) -> str:
        """Human-readable description for manifests and answers."""
        if self.kind == "default":
            return "default (last encoder layer + pooler + classifier)"
        if self.kind == "head":
            return "head (pooler + classifier)"
        if self.kind == "last_n":
            return f"last_n={self.n} (last {self.n} encoder layers + pooler + classifier)"
        if self.kind == "all":
            return "all parameters except the word-embedding matrix"
        return f"pattern {self.pattern!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "pattern": self.pattern}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScopeSpec:
        unknown = set(d) - {"kind", "n", "pattern"}
        if unknown:
            raise InvalidArgument.for_field(
                "scope", f"unknown keys {sorted(unknown)}; allowed: kind, n, pattern"
            )
        return cls(
            kind=str(d.get("kind", "default")),
            n=int(d.get("n", 1)),
            pattern=str(d.get("pattern", "")),
        )


def _is_head(name: str) -> bool:
    """Pooler and classifier parameters (BERT naming: bert.pooler.*, classifier.*)."""
    return (
        name.startswith(("classifier.", "pooler."))
        or ".classifier." in name
        or (".pooler." in name)
    )


# --------------------------------------------------------------------------------------------
# Encoded batch
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A tokenised batch with token → word alignment.

    input_ids, attention_mask: [B, T] (padded to the batch maximum, T <= max_length)
    word_ids[b][t]: index into words[b] of token t, None for special/pad tokens
    words[b]: the pre-tokenised words of text b (backend pre_tokenizer: "loved it!" →
      "loved", "it", "!"); words beyond the truncation point are kept (with no tokens)
    word_spans[b][w]: (start, end) character offsets of words[b][w] in texts[b]
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: list[list[int | None]]
    words: list[list[str]]
    word_spans: list[list[tuple[int, int]]]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A sequence classifier + fast tokenizer + influence scope, in eval mode on ``device``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    labels: list[str]
    scope: ScopeSpec = field(default_factory=ScopeSpec)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise FailedPrecondition(
                "pairdots needs a fast (Rust) tokenizer for word alignment; the model directory "
                "must contain tokenizer.json"
            )
        n_out = int(self.model.config.num_labels or 0)
        if len(self.labels) != n_out:
            raise InvalidArgument.for_field(
                "labels", f"{len(self.labels)} label names for a model with {n_out} outputs"
            )
        self.model.eval()
        self.model.requires_grad_(False)
        self._scope_names = self.scope.select(self.model)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        num_labels: int | None = None,
        labels: Sequence[str] | None = None,
        scope: ScopeSpec | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Task:
        """Load ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` from a local dir.

        labels default to the config's id2label when it has ``num_labels`` entries, else
        "label_0".."label_{C-1}". A base encoder (e.g. MiniLM, a ``BertModel``) gets a newly
        initialised classifier head, and so does a classifier checkpoint asked for a different
        number of classes. dtype defaults to float32.
        """
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise NotFound(f"no HuggingFace model at {p} (config.json missing); pass a model dir")
        if labels is not None and num_labels is not None and len(labels) != num_labels:
            raise InvalidArgument.for_field(
                "labels", f"{len(labels)} label names but num_labels={num_labels}"
            )
        n = num_labels if num_labels is not None else (len(labels) if labels is not None else None)
        config = AutoConfig.from_pretrained(p)
        saved_n = int(config.num_labels)
        if n is None:
            n = saved_n
        if labels is None:
            id2 = getattr(config, "id2label", None) or {}
            names = [str(id2.get(i, id2.get(str(i), ""))) for i in range(n)]
            labels = names if all(names) and len(id2) == n else [f"label_{i}" for i in range(n)]
        config.num_labels = n
        config.id2label = {i: str(lab) for i, lab in enumerate(labels)}
        config.label2id = {str(lab): i for i, lab in enumerate(labels)}
        with quiet_hf():  # no "newly initialized classifier" warning, no "Loading weights" bar
            model = AutoModelForSequenceClassification.from_pretrained(
                p,
                config=config,
                attn_implementation="eager",
                dtype=dtype or torch.float32,
                # a different number of classes than the checkpoint: new classifier head
                ignore_mismatched_sizes=n != saved_n,
            )
            tokenizer = AutoTokenizer.from_pretrained(p, use_fast=True)
        model.to(device)
        return cls(model, tokenizer, [str(x) for x in labels], scope or ScopeSpec(), device)  # type: ignore[arg-type]

    def save_pretrained(self, path: str | Path) -> None:
        """Write model (safetensors) and tokenizer to ``path``."""
        with quiet_hf():  # no "Writing model shards" bar
            self.model.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)

    # -- properties --------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def unk_token_id(self) -> int:
        """Id of the tokenizer's UNK token (Eq. 8 replaces a token by UNK)."""
        tid = self.tokenizer.unk_token_id
        if tid is None:
            raise FailedPrecondition("the tokenizer has no UNK token; Eq. 8 needs one")
        return int(tid)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens ([CLS], [SEP], [PAD], ...), never scored as words."""
        return frozenset(int(i) for i in self.tokenizer.all_special_ids)

    @property
    def scope_names(self) -> list[str]:
        return list(self._scope_names)

    def set_scope(self, scope: ScopeSpec) -> None:
        """Change the influence scope (validates it against the model)."""
        self._scope_names = scope.select(self.model)
        self.scope = scope

    # -- tokenisation ------------------------------------------------------------------------

    def split_words(self, text: str) -> list[tuple[str, tuple[int, int]]]:
        """Words of ``text`` as the tokenizer's normaliser + pre-tokenizer split them, with char
        offsets into the original text."""
        # Only the pre-tokenizer runs here (not the normaliser) so offsets index the original
        # text; the tokenizer normalises each word itself when called with is_split_into_words.
        pre = self.tokenizer.backend_tokenizer.pre_tokenizer
        if pre is None:
            return [(m.group(0), (m.start(), m.end())) for m in re.finditer(r"\S+", text)]
        return [(text[s:e], (s, e)) for _, (s, e) in pre.pre_tokenize_str(text)]

    def encode(self, texts: Sequence[str], max_length: int = 128) -> Encoded:
        """Tokenise ``texts`` into a padded batch with word alignment (see `Encoded`)."""
        if isinstance(texts, str):
            raise InvalidArgument.for_field("texts", "pass a list of strings, not one string")
        if not texts:
            raise InvalidArgument.for_field("texts", "at least one text is needed")
        words_all: list[list[str]] = []
        spans_all: list[list[tuple[int, int]]] = []
        for text in texts:
            pieces = self.split_words(text)
            words_all.append([w for w, _ in pieces])
            spans_all.append([sp for _, sp in pieces])
        enc = self.tokenizer(
            words_all,
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding="longest",
            return_tensors="pt",
        )
        word_ids = [list(enc.word_ids(b)) for b in range(len(texts))]
        return Encoded(
            input_ids=enc["input_ids"].to(self.device),  # [B, T]
            attention_mask=enc["attention_mask"].to(self.device),  # [B, T]
            word_ids=word_ids,
            words=words_all,
            word_spans=spans_all,
        )

    # -- the functions the core uses -----------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings e_t only (no position/type embeddings, no LayerNorm): [B,T] → [B,T,D].

        The model adds position/type embeddings and LayerNorm itself when given inputs_embeds.
        """
        return self.model.get_input_embeddings()(input_ids)

    def scope_params(self) -> dict[str, torch.Tensor]:
        """θ_scope as {name: tensor}: detached views sharing storage with the live parameters
        (no copy; requires_grad=False). Treat them as read-only; clone before in-place changes
        or before ``requires_grad_()``."""
        params = dict(self.model.named_parameters())
        return {nm: params[nm].detach() for nm in self._scope_names}

    def additive_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B,T] 0/1 padding mask → [B,1,1,T] additive mask (0 keep, finfo.min masked).

        Passed to the model as a prepared 4D mask so HF's mask builder returns it as-is;
        this keeps ``logits_fn`` free of data-dependent branches, so it runs under
        ``torch.func.vmap``.
        """
        import torch

        m = attention_mask.to(dtype)[..., None, None, :]  # [B,1,1,T]
        return (1.0 - m) * torch.finfo(dtype).min

    def logits_fn(
        self,
        params: Mapping[str, torch.Tensor],
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """logits = f(E; θ) with θ_scope replaced by ``params``: [B,T,D], [B,T] → [B,C].

        ``torch.func.functional_call(model, params, kwargs={inputs_embeds, attention_mask},
        strict=False)`` - parameters not in ``params`` are the model's own. Works under
        ``torch.func.vmap`` over single examples (call with ``E[None]``, ``mask[None]``).
        """
        from torch.func import functional_call

        if attention_mask.dim() == 4:  # already additive [B,1,1,T] (core.grads under vmap)
            mask4 = attention_mask
        else:
            mask4 = self.additive_mask(attention_mask, inputs_embeds.dtype)  # [B,1,1,T]
        out = functional_call(
            self.model,
            dict(params),
            args=(),
            kwargs={"inputs_embeds": inputs_embeds, "attention_mask": mask4},
            strict=False,
        )
        return out.logits  # [B, C]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy L = -log p(y|x) (Eq. 4's L(z, θ)): [B,C], [B] → [B]."""
        import torch.nn.functional as F

        return F.cross_entropy(logits, labels, reduction="none")

    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from token ids with the current parameters: [B,T] → [B,C]."""
        return self.logits_fn({}, self.embed(input_ids), attention_mask)

    def predict(
        self, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 64
    ) -> torch.Tensor:
        """Class probabilities p(·|x) for each text: [B, C] (no grad, eval mode)."""
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = self.encode(list(texts[i : i + batch_size]), max_length=max_length)
                logits = self.forward_ids(enc.input_ids, enc.attention_mask)  # [b, C]
                outs.append(torch.softmax(logits, dim=-1))
        return torch.cat(outs, dim=0)  # [B, C]
