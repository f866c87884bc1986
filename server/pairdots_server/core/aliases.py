"""Shared type aliases of the core."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from torch import Tensor

LogitsFn = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]
"""logits_fn(params, inputs_embeds [B,T,D], attention_mask [B,T]) -> logits [B,C].

``params`` holds only the scoped parameters (name -> tensor); everything else is fixed inside the
function. ``inputs_embeds`` are the *word* embeddings (the model adds position embeddings and
LayerNorm itself). For HF models the mask may also be the prepared additive 4D mask
[B,1,1,T] (0 keep, dtype-min drop), which HF returns as-is; ``core.grads`` uses that form under
vmap (see ``VmapMask``)."""

ShouldStop = Callable[[], None]
"""Called between solver iterations; raises (e.g. a cancellation error) to abort."""

FORWARD_AD_LOCK = threading.RLock()
"""Held around every ``torch.func.jvp``: torch.func's forward-mode nesting counter is a module
global, so two threads (even on different models) must not run a jvp at the same moment."""
