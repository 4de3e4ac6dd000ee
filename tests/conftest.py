"""Shared test fixtures: tiny random Llama models built in code (no downloads).

Two kinds: ``save_tiny`` (a character tokenizer: the search tests count tokens by characters)
and ``make_tiny_model`` (a small BPE tokenizer trained on retrieval-like text: the eval, lm-eval
and vLLM tests). The session fixtures ``tiny_char_dir`` and ``tiny_bpe_dir`` build each once.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be on before anything imports
# triton (transformers and our runtime may, from any test module): else a module that imported
# triton first leaves triton.language compiled and later interpreted kernels fail on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moa_plan.evals.quality.documents import LINES_INTRO, PASSKEY_FILLER, PASSKEY_INTRO, WORDS  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# pytestmark of a module that needs real CUDA kernels (without a GPU the interpreter is on, see above)
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="interpreter mode; run this module in its own process",
    ),
]


def tiny_config(config_cls=None, **kw):
    """A tiny decoder config (Llama unless ``config_cls`` says otherwise); ``kw`` overrides."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return (config_cls or LlamaConfig)(**base)


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
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama + char tokenizer saved as a transformers folder."""
    model = tiny_model(seed)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _corpus() -> list[str]:
    digits = " ".join(str(i) for i in range(100))
    words = " ".join(WORDS)
    lines = [
        f"line {a}-{b}: REGISTER_CONTENT is <{i * 7919 % 50000}>"
        for i, (a, b) in enumerate(zip(WORDS, reversed(WORDS)))
    ]
    return [
        LINES_INTRO,
        PASSKEY_INTRO,
        " ".join(PASSKEY_FILLER),
        digits,
        words,
        *lines,
        "What is the pass key? The pass key is 12345. Remember it.",
        "Now the record is over. Tell me what is the <REGISTER_CONTENT> in line x? I need the number.",
    ]


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (transformers fast tokenizer) trained on retrieval-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def make_tiny_model(
    folder: str | Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    max_positions: int = 4096,
    seed: int = 0,
    init_range: float = 0.02,
) -> Path:
    """Save a random LlamaForCausalLM and its tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_char_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a character tokenizer, saved as a transformers folder."""
    pytest.importorskip("transformers")
    return save_tiny(tmp_path_factory.mktemp("tiny-char") / "model")


@pytest.fixture(scope="session")
def tiny_bpe_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a small BPE tokenizer, saved as a transformers folder."""
    pytest.importorskip("transformers")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bpe") / "model")


@pytest.fixture
def config(tmp_path) -> Path:
    """A SmolLM2-shaped model folder's config.json (the plan-command tests check plans against it)."""
    import json

    from plan_cli import SMOLLM2_CONFIG

    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SMOLLM2_CONFIG))
    return path
