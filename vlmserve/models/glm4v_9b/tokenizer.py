"""GLM-4's tokenizer from the checkpoint's own files, run by the `tokenizers` library.

The checkpoint ships `tokenizer.model`: one "base64(token bytes) rank" line per token, a tiktoken-style byte-level
BPE (151329 tokens in GLM-4), split first by a cl100k-like regex; and `tokenizer_config.json`, whose
`added_tokens_decoder` lists the special tokens that follow the ranks: `<|endoftext|>` 151329, `[MASK]`,
`[gMASK]`, `[sMASK]`, `<sop>`, `<eop>`, `<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>`,
`<|begin_of_image|>` 151339, `<|end_of_image|>` 151340, `<|begin_of_video|>`, `<|end_of_video|>` 151342.

The rank file is converted once per load into the vocabulary and merges of a `tokenizers` BPE (see
`ranks_to_bpe`); `tokenizers` then does the encoding and decoding.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

#: GLM-4's pre-tokenization regex, as published in `tokenization_chatglm.py`
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

#: the special tokens, in id order after the last rank (used when tokenizer_config.json does not list them)
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken-style rank file."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def to_byte_level(token: bytes) -> str:
    # latin-1 maps each byte to the code point of the same value; translate then applies the alphabet in C
    return token.decode("latin-1").translate(_byte_to_unicode())


def ranks_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and ordered merges of a `tokenizers` BPE that encodes like the tiktoken ranks.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. Listing, for every
    token, each split into two known tokens as a merge with that token's rank gives a BPE that picks the same
    pair at every step (the conversion transformers' own tiktoken converter uses).
    NOTE: pure Python over every byte of the vocabulary, about a second for GLM-4's 151k tokens, once per load.
    """
    vocab = {to_byte_level(token): rank for token, rank in ranks.items()}
    ranked: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                ranked.append((rank, left_rank, right_rank, left, right))
    ranked.sort()
    merges = [(to_byte_level(left), to_byte_level(right)) for *_, left, right in ranked]
    return vocab, merges


def build_tokenizer(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with GLM-4's regex split and the given special tokens."""
    vocab, merges = ranks_to_bpe(ranks)
    for content, token_id in special_tokens.items():
        if content in vocab:
            raise ValueError(f"special token {content!r} collides with an ordinary token")
        vocab[content] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    ordered = sorted(special_tokens.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False) for content, _ in ordered])
    for content, token_id in ordered:
        if tokenizer.token_to_id(content) != token_id:
            raise ValueError(f"special token {content!r} did not get id {token_id}")
    return tokenizer


def special_tokens_of(path: Path, num_ranks: int) -> dict[str, int]:
    """Special tokens from tokenizer_config.json's `added_tokens_decoder`, else GLM-4's list after the ranks."""
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        if decoder:
            return {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    return {content: num_ranks + i for i, content in enumerate(GLM4_SPECIAL_TOKENS)}


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer as a transformers fast tokenizer (decode, convert_ids_to_tokens, ...)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    ranks = read_ranks(path / "tokenizer.model")
    specials = special_tokens_of(path, len(ranks))
    settings: dict[str, Any] = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    eos = settings.get("eos_token") or "<|endoftext|>"
    pad = settings.get("pad_token") or eos
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(ranks, specials),
        eos_token=eos, pad_token=pad, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=int(settings.get("model_max_length", 8192)),
    )
