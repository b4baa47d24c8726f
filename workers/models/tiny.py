"""Tiny randomly initialised models of each supported family, for fast tests.

They have the real families' structure (Gemma 3's post-feedforward norms, GPT-2's transposed
Conv1D projections) at a size where a forward pass over a batch takes milliseconds. The tokenizer
is byte-level with one token per byte, built in memory: it needs no downloaded file, knows every
string, and decodes back to exactly the text encoded (leading spaces included).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS, PAD, BOS = "<eos>", "<pad>", "<bos>"
EOS_ID, PAD_ID, BOS_ID = 256, 257, 258
VOCAB_SIZE = 259
FAMILIES = ("llama", "gemma3", "gpt2")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE works in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: token id = byte value, then eos/pad/bos. Right padding, pad token set.

    ``add_bos`` prepends ``<bos>`` to every encoding, as Gemma's tokenizer does.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({EOS: EOS_ID, PAD: PAD_ID, BOS: BOS_ID})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, bos_token=BOS, padding_side="right"
    )


_SPECIAL_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _config(family: str, overrides: dict):
    if family == "llama":
        base = dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True, **_SPECIAL_IDS,
        )
        return LlamaConfig(**{**base, **overrides})
    if family == "gemma3":
        base = dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
            sliding_window=16, max_position_embeddings=256, **_SPECIAL_IDS,
        )
        return Gemma3TextConfig(**{**base, **overrides})
    if family == "gpt2":
        base = dict(
            vocab_size=VOCAB_SIZE, n_embd=64, n_inner=192, n_layer=6, n_head=4, n_positions=256,
            **_SPECIAL_IDS,
        )
        return GPT2Config(**{**base, **overrides})
    raise ValueError(f"unknown tiny model family {family!r}; families: {', '.join(FAMILIES)}")


_MODEL_CLASSES = {"llama": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM, "gpt2": GPT2LMHeadModel}


def tiny_model(
    family: str = "llama", seed: int = 0, **config_overrides
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny model of ``family`` (float32, eval, no grads) and its byte-level tokenizer.

    The same seed gives the same weights; the global RNG state is left as it was.
    """
    config = _config(family, config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config)
        if family == "gemma3":
            # Gemma's RMSNorm scales by (1 + weight) and initialises weight to 0: give the norms
            # (the post-feedforward one included) non-trivial scales, as a trained model has.
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("norm.weight"):
                        param.uniform_(-0.5, 0.5)
    model.to(torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tiny_tokenizer(add_bos=family == "gemma3")


def save_tiny(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer with save_pretrained (a local model folder)."""
    path = Path(path)
    model, tokenizer = tiny_model(family, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
