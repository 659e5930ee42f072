"""Small, seeded, randomly initialised models for smoke tests, examples and CI.

They are built from configs (no download) with a byte-level tokenizer that needs no training,
so every text encodes losslessly offline. Their quality numbers mean nothing; their shapes and code
paths are those of the real architectures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, \
    PreTrainedModel, PreTrainedTokenizerFast

from lmslim.core import paths
from lmslim.core.io import atomic_dir, check_saved_model, file_lock

SEED = 0


def byte_tokenizer(style: str = "causal") -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer: 256 byte symbols plus special tokens, no merges.

    Args:
        style: ``causal`` (``<s>``, ``</s>``, ``<pad>``) or ``bert`` (``[CLS] … [SEP]`` template).
    """
    specials = ["<pad>", "<s>", "</s>", "<unk>"] if style == "causal" else ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[3] if style == "causal" else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if style == "causal":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]")


def _llama(vocab: int) -> PreTrainedModel:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _gpt2(vocab: int) -> PreTrainedModel:
    cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def _bert(vocab: int) -> PreTrainedModel:
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512, pad_token_id=0)
    return BertModel(cfg)


TINY: dict[str, tuple[Callable[[int], PreTrainedModel], str]] = {
    "tiny-llama": (_llama, "causal"),
    "tiny-gpt2": (_gpt2, "causal"),
    "tiny-bert": (_bert, "bert"),
}


def build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build the named tiny model (seeded) and its tokenizer in memory."""
    factory, style = TINY[name]
    tok = byte_tokenizer(style)
    torch.manual_seed(SEED)
    model = factory(len(tok))
    model.eval()
    return model, tok


def tiny_path(name: str) -> Path:
    """The tiny model's folder under ``$LMSLIM_HOME/models``, built on first use."""
    target = paths.models_dir() / name
    if (target / "config.json").is_file():
        return target
    with file_lock(target.parent / f".{name}.lock"):  # the ranks of a torchrun job build it once
        if (target / "config.json").is_file():
            return target
        model, tok = build_tiny(name)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            check_saved_model(tmp)
    return target
