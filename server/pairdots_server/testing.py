"""Helpers for tests and benchmarks: tiny BERT models and tiny bundles built offline in seconds.

``build_tiny_model_dir`` writes a randomly initialised BertForSequenceClassification (hidden
32, 2 layers by default) with a WordPiece tokenizer whose vocabulary is the special tokens, the
given words and every single character (plus ``##`` continuations), so any ASCII text
tokenises without UNKs. ``make_tiny_bundle`` fine-tunes such a model for a few steps on a few
SST-2 sentences (synthetic sentences when the SST-2 files are absent) and writes a real bundle.
Both are deterministic for a given seed.
"""

from __future__ import annotations

import random
import re
import string
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pairdots_server.errors import PairdotsError

if TYPE_CHECKING:
    import torch

    from pairdots_server.model.task import Task
    from pairdots_server.storage.data import Example

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BASE_WORDS = (
    "the",
    "a",
    "movie",
    "film",
    "it",
    "is",
    "was",
    "not",
    "good",
    "bad",
    "great",
    "awful",
    "loved",
    "hated",
    "boring",
    "funny",
    "and",
    "but",
    "i",
    "this",
)
_POS = ("good", "great", "funny", "moving", "brilliant", "charming", "fresh", "delightful")
_NEG = ("bad", "awful", "boring", "dull", "tedious", "clumsy", "stale", "lifeless")
_NOUNS = ("movie", "film", "story", "plot", "cast", "script", "ending", "soundtrack")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words_of(texts: Iterable[str]) -> list[str]:
    """Distinct lowercased words/punctuation marks of texts, in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        for w in _WORD_RE.findall(t.lower()):
            seen.setdefault(w, None)
    return list(seen)


def build_tiny_model_dir(
    path: str | Path,
    vocab_words: Iterable[str] = BASE_WORDS,
    num_labels: int = 2,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    dtype: torch.dtype | None = None,
    max_positions: int = 128,
) -> Path:
    """Write a tiny random BertForSequenceClassification + fast WordPiece tokenizer to path.

    Vocabulary: SPECIAL_TOKENS, then the lowercased vocab_words, then every printable ASCII
    character c and "##c". Weights from torch.manual_seed(seed); dtype default float32.
    """
    import torch
    from transformers import (  # type: ignore[attr-defined]
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    from pairdots_server.model.task import quiet_hf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    for w in vocab_words:
        w = w.strip().lower()
        if w and not any(ch.isspace() for ch in w):
            vocab.setdefault(w, None)
    for c in chars:
        vocab.setdefault(c, None)
    for c in chars:
        vocab.setdefault("##" + c, None)
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    try:
        tokenizer = BertTokenizerFast(vocab=str(vocab_file))  # transformers >= 5
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file))  # transformers 4.x
    tokenizer.model_max_length = max_positions

    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        pad_token_id=0,
        id2label={i: f"label_{i}" for i in range(num_labels)},
        label2id={f"label_{i}": i for i in range(num_labels)},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model = model.to(dtype or torch.float32)  # type: ignore[arg-type]
    model.config.name_or_path = f"pairdots-tiny-bert-seed{seed}"
    with quiet_hf():
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    return path


def synthetic_examples(n: int, seed: int = 0) -> list[Example]:
    """n sentences "the <noun> was <adj> ." with label 1 for a positive adjective, else 0."""
    from pairdots_server.storage.data import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        adj = rng.choice(_POS if label else _NEG)
        noun = rng.choice(_NOUNS)
        tmpl = rng.choice(("the {n} was {a} .", "a {a} {n} .", "this {n} is {a} and {a2} ."))
        adj2 = rng.choice(_POS if label else _NEG)
        out.append(Example(tmpl.format(n=noun, a=adj, a2=adj2), label))
    return out


def tiny_examples(n: int, seed: int = 0, *, split: str = "train") -> list[Example]:
    """The first n SST-2 examples of ``split`` when the shared data is present, else synthetic."""
    from pairdots_server.storage.data import default_sst2_dir, read_examples

    try:
        return read_examples(default_sst2_dir() / f"{split}.tsv", limit=n)
    except PairdotsError:
        return synthetic_examples(n, seed=seed + (0 if split == "train" else 1000))


def make_tiny_task(
    vocab_words: Iterable[str] = BASE_WORDS,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    labels: Sequence[str] = ("negative", "positive"),
    **model_kw: int,
) -> Task:
    """A Task on a freshly built tiny model (written to a temporary dir, then loaded)."""
    from pairdots_server.model.task import Task

    with tempfile.TemporaryDirectory(prefix="pairdots-tiny-") as d:
        build_tiny_model_dir(
            d, vocab_words, num_labels=len(labels), seed=seed, dtype=dtype, **model_kw
        )
        return Task.from_pretrained(d, labels=list(labels), dtype=dtype)


def make_tiny_bundle(
    root: str | Path,
    name: str = "tiny",
    n_train: int = 64,
    seed: int = 0,
    finetune_steps: int = 40,
    *,
    dtype: torch.dtype | None = None,
    n_dev: int = 32,
    scope: object | None = None,
    overwrite: bool = False,
    threads: int | None = 1,
) -> Path:
    """Build, fine-tune (finetune_steps steps of AdamW, lr 3e-3, batch 16) and save a tiny
    bundle ``<root>/<name>`` from the first n_train SST-2 sentences; returns its path.

    threads: torch intra-op threads while building (restored after); 1 is fastest for a
    model this small and avoids thrashing on shared cores. None leaves the setting alone.
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _make_tiny_bundle(
            root,
            name,
            n_train,
            seed,
            finetune_steps,
            dtype=dtype,
            n_dev=n_dev,
            scope=scope,
            overwrite=overwrite,
        )
    finally:
        torch.set_num_threads(before)


def _make_tiny_bundle(
    root: str | Path,
    name: str,
    n_train: int,
    seed: int,
    finetune_steps: int,
    *,
    dtype: torch.dtype | None,
    n_dev: int,
    scope: object | None,
    overwrite: bool,
) -> Path:
    import torch

    from pairdots_server.model.scope import ScopeSpec
    from pairdots_server.model.task import Task
    from pairdots_server.model.train import TrainConfig, evaluate, fine_tune
    from pairdots_server.storage.bundle import save_bundle

    train = tiny_examples(n_train, seed)
    dev = tiny_examples(n_dev, seed, split="dev")
    labels = ["negative", "positive"]
    cfg = TrainConfig(
        epochs=1000,
        batch_size=16,
        lr=3e-3,
        warmup_ratio=0.0,
        max_length=64,
        seed=seed,
        max_steps=finetune_steps,
    )
    with tempfile.TemporaryDirectory(prefix="pairdots-tiny-") as d:
        vocab = list(BASE_WORDS) + words_of(ex.text for ex in train + dev)
        build_tiny_model_dir(d, vocab, num_labels=2, seed=seed, dtype=dtype)
        sc = scope if isinstance(scope, ScopeSpec) else ScopeSpec()
        task = Task.from_pretrained(d, labels=labels, scope=sc, dtype=dtype or torch.float32)
        result = fine_tune(task, train, cfg)
        ev = evaluate(task, dev)
        extra = {
            "dataset": {"path": "tiny:sst2-head" if train else "tiny"},
            "train": {**cfg.to_dict(), "steps": result.steps, "final_loss": result.final_loss},
            "dev": {"count": len(dev), "accuracy": ev.accuracy, "loss": ev.loss},
            "model": {"source": f"pairdots.testing.build_tiny_model_dir(seed={seed})"},
        }
        return save_bundle(root, name, task, train, extra, overwrite=overwrite)


# -- a planted-cue data set (the right pairing is known) --------------------------------------

PLANTED_FILLER = (
    "the", "movie", "film", "story", "plot", "was", "is", "a", "it", "and", "this", "cast",
)
PLANTED_CUES = {"zorp": 1, "quib": 1, "blick": 0, "fexa": 0}


def planted_cue_examples(n_per_cue: int = 20, flipped: int = 2, seed: int = 0) -> list[Example]:
    """Neutral filler plus exactly one cue word per sentence; the cue decides the label
    (PLANTED_CUES), except for the first `flipped` sentences of every cue, which carry the
    other label (label noise). Shuffled, deterministic for a seed."""
    from pairdots_server.storage.data import Example

    rng = random.Random(seed)
    out = []
    for cue, label in PLANTED_CUES.items():
        for k in range(n_per_cue):
            words = [rng.choice(PLANTED_FILLER) for _ in range(rng.randint(3, 6))]
            words.insert(rng.randint(0, len(words)), cue)
            out.append(Example(" ".join(words), 1 - label if k < flipped else label))
    rng.shuffle(out)
    return out


def planted_cue(text: str) -> str | None:
    """The planted cue word of a text, or None."""
    return next((w for w in text.split() if w in PLANTED_CUES), None)


def add_index_and_lowrank(path: str | Path, index_dim: int = 64, low_rank: int = 8) -> Path:
    """Add a candidate index (index_dim-dimensional projection) and low-rank GGN factors to the
    bundle at `path`, as prepare would; returns the path."""
    from typing import Any

    from pairdots_server.influence.artifacts import (
        ArtifactConfig,
        build_index_dir,
        index_files,
        lowrank_bytes,
    )
    from pairdots_server.influence.runtime import LOWRANK_FILE, ModelRuntime
    from pairdots_server.storage.bundle import load_bundle
    from pairdots_server.storage.update import update_bundle

    rt = ModelRuntime(load_bundle(path))
    cfg = ArtifactConfig(index_dim=index_dim, low_rank=low_rank)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = build_index_dir(rt, cfg, Path(tmp) / "index", progress=False)
        files: dict[str, Any] = dict(index_files(index_dir))
        files[LOWRANK_FILE] = lowrank_bytes(rt, cfg.low_rank)
        update_bundle(path, files, {})
    return Path(path)


def make_tiny_root(root: str | Path) -> Path:
    """<root>/tiny: the tiny test bundle (64 SST-2 sentences) with a candidate index and
    low-rank curvature; returns root."""
    add_index_and_lowrank(make_tiny_bundle(root, "tiny", n_train=64))
    return Path(root)
