"""A tiny random Llama-shaped model with a small offline BPE tokenizer, saved as a normal folder.

Tests and smoke runs need a model that lm-eval and transformers load from disk without any hub
access; the tokenizer is trained in code on text like the retrieval prompts, so every prompt
tokenizes without unknown tokens.
"""

from __future__ import annotations

from pathlib import Path

from moa_plan.evals.generate import LINES_INTRO, PASSKEY_FILLER, PASSKEY_INTRO, WORDS


def _corpus() -> list[str]:
    digits = " ".join(str(i) for i in range(100))
    words = " ".join(WORDS)
    lines = [f"line {a}-{b}: REGISTER_CONTENT is <{i * 7919 % 50000}>" for i, (a, b) in
             enumerate(zip(WORDS, reversed(WORDS)))]
    return [LINES_INTRO, PASSKEY_INTRO, " ".join(PASSKEY_FILLER), digits, words, *lines,
            "What is the pass key? The pass key is 12345. Remember it.",
            "Now the record is over. Tell me what is the <REGISTER_CONTENT> in line x? I need the number."]


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (transformers fast tokenizer) trained on retrieval-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_tiny_model(folder: str | Path, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                    max_positions: int = 4096, seed: int = 0, init_range: float = 0.02) -> Path:
    """Save a random LlamaForCausalLM and its tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=init_range)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
