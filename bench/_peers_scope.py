"""The influence scope as a plain nn.Module on cached scope inputs, for bench/peers.py.

Every library in the race (pairdots, Kronfluence, dattri, Captum) gets the same function:
logits = classifier(pooler(layer_L(h, mask))) of the bundle's model, where h [B,T,D] are the
hidden states entering the last encoder layer (computed once by bench/faithfulness.py's
`prepare` phase and cached; the frozen layers below never change). Its parameters are exactly
the bundle's scope (last encoder layer + pooler + classifier), in the bundle's flat order, so a
gradient from any library is the same vector ∇θL(z) that pairdots' solvers take.

Also here: the padded data sets the libraries iterate (sorted by length, so a batch carries
little padding; scores are mapped back to training-set order), the measurement f = m_y (the
logit margin of the predicted label, pairdots' prediction-level measurement) and the agreement
metrics (Spearman over the reference's top 100, top-10 overlap).
"""

from __future__ import annotations

import copy
import resource
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairdots_server.influence.runtime import ModelRuntime


class ScopeNet(nn.Module):
    """The bundle's scope as a module: forward(h [B,T,D], mask [B,T] 0/1) -> logits [B,C].

    Deep copies of the bundle's last layer, pooler and classifier (the bundle's model is never
    touched); eval mode (dropout off). `bundle_names[i]` is the runtime's name of the i-th
    parameter, in ModelRuntime.params order."""

    def __init__(self, rt: ModelRuntime) -> None:
        super().__init__()
        model: Any = rt.task.model  # a HF BertForSequenceClassification
        last = len(model.bert.encoder.layer) - 1
        self.layer = copy.deepcopy(model.bert.encoder.layer[last])
        self.pooler = copy.deepcopy(model.bert.pooler)
        self.classifier = copy.deepcopy(model.classifier)
        self._additive_mask = rt.task.additive_mask
        self.eval()
        prefixes = {
            "layer.": f"bert.encoder.layer.{last}.",
            "pooler.": "bert.pooler.",
            "classifier.": "classifier.",
        }
        names = []
        for name, p in self.named_parameters():
            p.requires_grad_(True)
            short = next(k for k in prefixes if name.startswith(k))
            names.append(prefixes[short] + name[len(short) :])
        if names != list(rt.params):
            raise SystemExit(
                f"scope mismatch: module {names[:3]}… vs bundle {list(rt.params)[:3]}…"
            )
        self.bundle_names = names
        with torch.no_grad():
            for p, name in zip(self.parameters(), names):
                if p.shape != rt.params[name].shape or not torch.equal(p, rt.params[name]):
                    raise SystemExit(f"{name}: the copy differs from the bundle's parameter")

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        out = self.layer(hidden, attention_mask=self._additive_mask(mask, hidden.dtype))
        h = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.pooler(h))

    def logits_fn(self) -> Callable[..., Tensor]:
        """(params keyed by the bundle's names, h, mask) -> logits: pairdots' LogitsFn."""
        mine = [n for n, _ in self.named_parameters()]

        def fn(params: dict[str, Tensor], hidden: Tensor, mask: Tensor) -> Tensor:
            p = {m: params[b] for m, b in zip(mine, self.bundle_names)}
            return torch.func.functional_call(self, p, (hidden, mask))

        return fn


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """m_y = z_y − max_{c≠y} z_c per row: logits [B,C], labels [B] -> [B]."""
    z_y = logits.gather(1, labels.long()[:, None])[:, 0]
    other = logits.scatter(1, labels.long()[:, None], float("-inf"))
    return z_y - other.max(1).values


def pad(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Rows [T_i,D] -> zero-padded [B,T,D] and the 0/1 mask [B,T] (long)."""
    t = max(int(r.shape[0]) for r in rows)
    h = torch.zeros(len(rows), t, rows[0].shape[1], dtype=rows[0].dtype)
    m = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        h[i, : r.shape[0]] = r
        m[i, : r.shape[0]] = 1
    return h, m


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Examples (h [T,D], label) in the order given by `order` (item k = example order[k])."""

    def __init__(self, hidden: Sequence[Tensor], labels: Sequence[int], order: Sequence[int]):
        self.hidden, self.labels, self.order = hidden, labels, list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[Tensor, int]:
        i = self.order[k]
        return self.hidden[i], int(self.labels[i])


def collate(items: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """[(h, y)] -> (h [B,T,D], mask [B,T], y [B]) padded to the batch's longest row."""
    h, m = pad([it[0] for it in items])
    return h, m, torch.tensor([it[1] for it in items], dtype=torch.long)


def length_order(hidden: Sequence[Tensor], rows: Sequence[int]) -> list[int]:
    """`rows` sorted by sequence length (then index): batches of neighbours pad little."""
    return sorted(rows, key=lambda i: (int(hidden[i].shape[0]), i))


def loader(ds: Rows, batch_size: int, listed: bool = False) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    """A sequential (unshuffled) DataLoader over `ds` with padding per batch; `listed` batches
    are lists (dattri's Arnoldi cache assigns into them)."""
    fn = (lambda items: list(collate(items))) if listed else collate
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=fn)


def mean_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """The training loss L = mean cross-entropy of a batch (what the model was trained on)."""
    return F.cross_entropy(logits, labels.long())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ of two 1-D tensors (Pearson of the ranks; ties broken by position)."""
    ra = torch.empty_like(a, dtype=torch.float64)
    rb = torch.empty_like(b, dtype=torch.float64)
    ra[a.argsort()] = torch.arange(len(a), dtype=torch.float64)
    rb[b.argsort()] = torch.arange(len(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else float("nan")


def agreement(ref: Tensor, got: Tensor, top: int = 100, k: int = 10) -> dict[str, float]:
    """How a method's influence I(z_i, f) over the training set [N] agrees with the reference's:
    Spearman over the reference's `top` most supporting examples (largest I), over all N, and
    the overlap of the two top-k supporting sets (|A ∩ B| / k)."""
    idx = ref.argsort(descending=True)[:top]
    top_ref = set(ref.argsort(descending=True)[:k].tolist())
    top_got = set(got.argsort(descending=True)[:k].tolist())
    return {
        "spearman_top100": spearman(ref[idx], got[idx]),
        "spearman_all": spearman(ref, got),
        "top10_overlap": len(top_ref & top_got) / k,
    }
