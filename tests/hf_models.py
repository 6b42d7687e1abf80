"""Tiny random Hugging Face models of the Llama family, built with `transformers` and saved locally (no network).

Two tokenizers as today's models ship them: a SentencePiece-style BPE (Metaspace, byte fallback, <s>/</s>,
Llama 2/TinyLlama/Mistral) and a byte-level BPE with ChatML turn tokens (Qwen2, SmolLM2-Instruct).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pocketgpt.model.tokenizer import EOT
from tests.conftest import small_corpus

SP_SPECIALS = ["<unk>", "<s>", "</s>"]
CHATML = ["<|im_start|>", "<|im_end|>"]
# Llama 2's chat format, and ChatML (Qwen2/SmolLM2): what a model folder's tokenizer_config.json carries.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% else %}{{ '<<SYS>>' + m['content'] "
    "+ '<</SYS>>' }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sentencepiece_tokenizer(vocab_size: int = 600) -> HFTokenizer:
    """Llama-2-style: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then BPE merges over "▁"-words.

    The corpus is ASCII-heavy, so Chinese and emoji encode through byte fallback.
    """
    base = HFTokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator(small_corpus(), trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False))
    trained = sorted(base.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate([*SP_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))])}

    def ascii_word(token: str) -> bool:  # keep non-ASCII text out of the vocabulary: it goes through bytes
        return all(c == "▁" or ord(c) < 128 for c in token)

    for token, _ in trained:
        if ascii_word(token):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(base.to_str())["model"]["merges"]]
    merges = [m for m in merges if ascii_word("".join(m))]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(SP_SPECIALS)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return hf


def chatml_tokenizer(vocab_size: int = 320) -> HFTokenizer:
    """Byte-level BPE with <|endoftext|> and the ChatML turn tokens as special tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, *CHATML], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(small_corpus(), trainer=trainer)
    return hf


def save_llama_family(root: Path, arch: str, **overrides) -> tuple[Path, torch.nn.Module]:
    """A tiny random `arch` ("llama", "qwen2", "mistral") model folder as save_pretrained writes it.

    Llama and Mistral get the SentencePiece-style tokenizer, Qwen2 the ChatML byte-level one, each with its
    tokenizer_config.json (chat template) and generation_config.json.
    """
    import transformers

    sp = arch != "qwen2"
    tok = sentencepiece_tokenizer() if sp else chatml_tokenizer()
    vocab = tok.get_vocab_size()
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-6)
    if sp:
        common.update(bos_token_id=1, eos_token_id=2)
    else:
        common.update(bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"))
    common.update(overrides)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[arch]
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "mistral": transformers.MistralForCausalLM}[arch]
    torch.manual_seed(0)
    model = model_class(config_class(**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(std=0.5)  # transformers zero-initialises biases: make Qwen2's q/k/v biases count
    model.save_pretrained(root, safe_serialization=True)
    tok.save(str(root / "tokenizer.json"))
    if sp:
        tok_cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                   "chat_template": LLAMA2_TEMPLATE}
        gen = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        tok_cfg = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}
        gen = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id(EOT)]}
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (root / "generation_config.json").write_text(json.dumps(gen))
    return root, model
