"""Qwen-VL-Chat's tokenizer, rebuilt from the checkpoint's `qwen.tiktoken` with the `tokenizers` library.

`qwen.tiktoken` holds one "base64(token bytes) rank" line per byte-level BPE token, ranks 0..N-1 without gaps.
The original (`tokenization_qwen.py`) hands it to tiktoken: text is NFC-normalised, split by Qwen's regex, and
each piece is merged bottom-up, always merging the adjacent pair whose concatenation has the lowest rank. The same
result comes from a `tokenizers` BPE whose merge list holds every (left, right) split of every token, ordered by
the rank of the token they form; with `ignore_merges`, a piece that is itself a token is taken whole, as tiktoken
does.

Special tokens follow the BPE ranks in this order (ids N, N+1, ...): <|endoftext|>, <|im_start|>, <|im_end|>,
<|extra_0|> .. <|extra_204|>, then <ref>, </ref>, <box>, </box>, <quad>, </quad>, <img>, </img>, <imgpad>.
With the published 151,643-token file: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
<img> 151857 (config.json's visual.image_start_id), </img> 151858, <imgpad> 151859.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

VOCAB_FILE = "qwen.tiktoken"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRA_TOKENS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_PAD = "<imgpad>"
#: grounding and image markup, in the original's order
VISION_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMAGE_START, IMAGE_END, IMAGE_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *EXTRA_TOKENS, *VISION_TOKENS)

#: Qwen's pre-tokenization regex (note the single-digit \p{N}: numbers split into digits)
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file; raises ValueError unless ranks are 0..N-1 without gaps."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'base64-token rank'")
        ranks[base64.b64decode(fields[0])] = int(fields[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def write_ranks(path: str | Path, ranks: dict[bytes, int]) -> None:
    """Write ranks in the tiktoken file format (used to build test checkpoints)."""
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in
             sorted(ranks.items(), key=lambda item: item[1])]
    Path(path).write_text("".join(lines), encoding="ascii")


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte that byte-level BPE vocabularies use (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _merges(ranks: dict[bytes, int]) -> Iterator[tuple[int, bytes, bytes]]:
    """(rank of the merged token, left, right) for every split of every token into two tokens."""
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                yield rank, left, right


def build_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the original tiktoken encoding, special tokens included."""
    symbols = _byte_symbols()

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for _, left, right in sorted(_merges(ranks), key=lambda m: m[0])]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for offset, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != len(ranks) + offset:
            raise ValueError(f"special token {token} did not get id {len(ranks) + offset}")
    return backend


def load_tokenizer(path: str | Path, *, model_max_length: int | None = None) -> Any:
    """A transformers fast tokenizer for the checkpoint directory (or the tiktoken file) at `path`."""
    from transformers import PreTrainedTokenizerFast

    file = Path(path)
    if file.is_dir():
        file = file / VOCAB_FILE
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_backend(read_ranks(file)), eos_token=IM_END,
                                        pad_token=ENDOFTEXT, unk_token=None, bos_token=None,
                                        clean_up_tokenization_spaces=False)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


_TURN_SPLIT = re.compile(f"({re.escape(IM_START)}|{re.escape(IM_END)})")


def chatml_pieces(text: str) -> Iterator[str]:
    """`text` cut where the original's `make_context` encodes separately.

    The original tokenizes each turn as <|im_start|> + role + "\\n" + content + <|im_end|>, with "\\n" between
    turns, each piece on its own. Encoding the joined text can merge across those seams (e.g. a role's newline
    with newlines that open the content), so prompts are encoded piece by piece.
    """
    opened = False
    for chunk in _TURN_SPLIT.split(text):
        if chunk in (IM_START, IM_END):
            yield chunk
            opened = chunk == IM_START
            continue
        if opened and "\n" in chunk:
            role, content = chunk.split("\n", 1)
            yield from (piece for piece in (role, "\n", content) if piece)
        elif chunk:
            yield chunk
        opened = False


def encode_chatml(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a ChatML prompt, encoded piece by piece like the original (see `chatml_pieces`)."""
    ids: list[int] = []
    for piece in chatml_pieces(text):
        ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids
