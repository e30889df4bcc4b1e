"""Tiny random models of each family the engine supports, built in code and saved as Hugging
Face folders with a byte-level tokenizer.json (no download): what a user brings, in small.

The tokenizer is the tiny model's idea (one token per byte, a small vocabulary) as a `tokenizers`
file, which is what real folders ship: the tiny model's ByT5Tokenizer saved in a folder is not
read back as itself by AutoTokenizer for every model type (Qwen2 gets a Qwen2Tokenizer that
yields no ids; Mistral and Phi-3 fail without a tokenizer.json)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GenerationConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fineinfer_jupyter.engine.models import TINY_CHAT_TEMPLATE

WINDOW = 8  # sliding window of the families that have one: shorter than the tests' contexts
SOFTCAP = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW)

# family -> (config class, model class, what it adds to the common tiny config)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
    # layer 0 full, layer 1 sliding (max_window_layers)
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=8)),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=8)),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(**GEMMA, **SOFTCAP)),  # sliding, full
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            **GEMMA,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(sliding_window=WINDOW)),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {}),  # not walked: the model's own forward
}
WALKED = [f for f in FAMILIES if f != "gpt_neox"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, plus <pad> (0), </s> (1) and <unk> (2); the tiny chat template."""
    specials = ["<pad>", "</s>", "<unk>"]
    symbols = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build(family: str, **overrides):
    """(model in fp32, tokenizer) of a tiny random `family` model (`overrides`: config fields)."""
    tokenizer = byte_tokenizer()
    config_cls, model_cls, extra = FAMILIES[family]
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # logits far apart: greedy tokens do not flip on rounding
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )
    config = config_cls(**{**fields, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    )
    return model.eval(), tokenizer


def save(family: str, folder, **overrides) -> str:
    model, tokenizer = build(family, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
