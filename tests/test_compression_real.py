"""Pruning and low-rank on real weights (MiniLM-L6), measured by sentence-embedding cosine to the
unchanged model on the evaluation text (calibration reads a different novel)."""

from __future__ import annotations

import pytest

import xopt
from xopt.evaluate import evaluate
from xopt.passes import CleanupPass
from xopt.pipeline import PassManager, parse_spec
from xopt.runnable import open_runnable
from xopt.text import read_text

pytestmark = pytest.mark.slow

SENTENCES = 128


@pytest.fixture(scope="module")
def minilm_cosine(minilm, tmp_path_factory):
    """spec → (cosine min, cosine mean) of the cleaned-up MiniLM after `spec`."""
    scratch = tmp_path_factory.mktemp("minilm-compression")
    cleaned = CleanupPass()(minilm.clone()).model
    xopt.save(cleaned, scratch / "fp32")
    reference = open_runnable(scratch / "fp32", threads=2)
    text = read_text(None, "evaluation")

    def measure(spec: str) -> tuple[float, float]:
        model, _ = PassManager(parse_spec(spec), verify=False)(cleaned)
        folder = scratch / str(abs(hash(spec)))
        xopt.save(model, folder)
        quality = evaluate(open_runnable(folder, threads=2), text, reference, max_sentences=SENTENCES)
        return quality.cosine_min, quality.cosine_mean

    return measure


def test_whitened_svd_keeps_minilm_far_closer_than_plain_svd(minilm_cosine):
    """10% of the block parameters removed (benchmarks/LOW_RANK.md: min cosine svd 0.64, svdllm 0.90)."""
    plain = minilm_cosine("low-rank(ratio=0.1,method=svd,objective=size)")
    whitened = minilm_cosine("low-rank(ratio=0.1,method=svdllm,objective=size)")
    assert whitened[0] > plain[0] + 0.1 and whitened[1] > 0.93


def test_dropping_the_least_important_minilm_block_keeps_embeddings_close(minilm_cosine):
    cosine_min, cosine_mean = minilm_cosine("prune-layers(n=1,method=drop,score=angular)")
    assert cosine_mean > 0.9 and cosine_min > 0.7
