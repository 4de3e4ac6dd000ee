"""Tiny random Llama + character tokenizer for the search tests (built in code, no downloads); no tests here."""

from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, attn: str = "sdpa", init_std: float = 0.2, **kw):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(initializer_range=init_std, **kw)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    return model


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()  # decode joins characters without spaces: text round-trips
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama + char tokenizer saved as a transformers folder."""
    model = tiny_model(seed)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
