"""The task error a lossy pass budgets: how far a candidate's outputs are from the reference
(unchanged) model's on calibration text, in the terms of the task metric `xopt eval` reports.

- causal LM: mean KL(p_ref ‖ p) in nats per predicted token, over the first calibration windows;
- encoder: 1 − the smallest cosine, over the first calibration sentences (`sentences`), between the two models' sentence
  embeddings (mean-pooled last hidden state), i.e. 1 − `cosine_min`.

The reference's outputs are computed once; each candidate costs one ONNX Runtime session and one
pass over the same feeds. Calibration text, never the evaluation text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from xopt.backends.onnxruntime import create_session, run
from xopt.calibration import calibration_feeds
from xopt.capture.huggingface import TASK_CAUSAL_LM
from xopt.evaluate import SENTENCE_BATCH, cosine, kl_sum, log_softmax, mean_pool
from xopt.runnable import model_task

WINDOW_TOKENS = 256  # per causal-LM calibration window


class TaskError:
    """Call with a candidate model (same inputs and outputs as the reference) for its task error."""

    def __init__(
        self,
        reference: ir.Model,
        text_file: str | Path | None = None,
        *,
        windows: int = 2,
        sentences: int = 128,
        threads: int | None = None,
    ):
        self.causal_lm = model_task(reference) == TASK_CAUSAL_LM
        self.threads = threads
        self.unit = "KL nats/token" if self.causal_lm else "1 − min cosine"
        windows = windows if self.causal_lm else -(-sentences // SENTENCE_BATCH)
        self.feeds = calibration_feeds(reference, text_file, window=WINDOW_TOKENS, windows=windows)
        self.reference = self._outputs(reference)

    def __call__(self, candidate: ir.Model) -> float:
        outputs = self._outputs(candidate)
        if self.causal_lm:
            kl = sum(kl_sum(p, q) for p, q in zip(self.reference, outputs, strict=True))
            return kl / sum(p[..., 0].size for p in self.reference)
        cosines = [cosine(a, b) for a, b in zip(self.reference, outputs, strict=True)]
        return float(1.0 - np.min(np.concatenate(cosines)))

    def _outputs(self, model: ir.Model) -> list[np.ndarray]:
        """Per feed: log-probabilities [B, T, V] (causal LM) or sentence embeddings [B, d]."""
        session = create_session(model, threads=self.threads)
        names = [o.name for o in session.get_outputs()]
        wanted = ([n for n in names if "logits" in n.lower()][:1] or names[:1]) if self.causal_lm else names[:1]
        outputs = []
        for feed in self.feeds:
            array = run(session, feed, wanted)[wanted[0]]
            if self.causal_lm:
                outputs.append(log_softmax(array))
            else:
                mask = feed.get("attention_mask", np.ones(array.shape[:2], np.int64))
                outputs.append(mean_pool(array.astype(np.float64), mask))
        return outputs
