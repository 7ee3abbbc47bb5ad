"""A full-size, offline, ASCII-only byte-level BPE vocabulary for benchmark checkpoints.

Real tokenizers cannot be downloaded here, and a tiny one would make the benchmark lie: detokenising ids drawn
from a 152k-row embedding through a 400-token vocabulary yields empty strings for almost every id. This builds a
vocabulary of the published size instead. Every regular token is 1-4 printable ASCII characters (in the byte-level
alphabet), so any id a random model emits decodes to ASCII and no stream ever holds back a broken UTF-8 sequence.
Special tokens sit at the ids the published checkpoint gives them.
"""

from __future__ import annotations

import itertools
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Printable ASCII plus newline and tab, most useful first: the 3-character tokens are drawn from the head of
# this list, so ordinary English words become few tokens.
_PRIORITY = (
    " " + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,?!'\"-:;()\n" + "\t"
    + "".join(ch for ch in string.punctuation if ch not in ".,?!'\"-:;()")
)


def byte_level_char(ch: str) -> str:
    """The symbol GPT-2-style byte-level BPE uses for one ASCII character (' ' -> 'Ġ', newline -> 'Ċ')."""
    return _byte_to_unicode()[ord(ch)]


def _byte_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _regular_tokens(num_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """`num_tokens` token strings and the merges that build them: all singles, all pairs, then triples.

    Each triple that does not start with a space also comes as a space-led 4-character token, so about half of
    the vocabulary starts a word, as in real BPE vocabularies. That matters for streaming: word-boundary
    streamers (transformers' TextIteratorStreamer) hold text back until a space, and a vocabulary with few spaces
    would delay their first chunk by many decode steps.
    """
    symbols = [byte_level_char(ch) for ch in _PRIORITY]
    assert len(symbols) == len(set(symbols)) == 97
    space = symbols[0]
    tokens = list(symbols)
    merges: list[tuple[str, str]] = []
    for a, b in itertools.product(symbols, repeat=2):
        tokens.append(a + b)
        merges.append((a, b))
    # Triples in order of their rarest symbol, so the most common characters' triples come first.
    for k in range(len(symbols)):
        for triple in itertools.product(symbols[: k + 1], repeat=3):
            if len(tokens) >= num_tokens:
                return tokens[:num_tokens], merges[: num_tokens - len(symbols)]
            if max(symbols.index(s) for s in triple) != k:
                continue
            word = "".join(triple)
            tokens.append(word)
            merges.append((triple[0] + triple[1], triple[2]))
            if triple[0] != space:
                tokens.append(space + word)
                merges.append((space, word))
    raise ValueError(f"cannot build {num_tokens} tokens of at most 4 ASCII characters")


def build_full_vocab_tokenizer(*, vocab_size: int, special_tokens: dict[str, int]) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` ids; `special_tokens` maps each special token to its id.

    Ids not taken by a special token are regular ASCII tokens, also above the specials (the padded rows of the
    published embedding), so every id the model can emit decodes to text.
    """
    special_ids = set(special_tokens.values())
    if len(special_ids) != len(special_tokens) or max(special_ids) >= vocab_size:
        raise ValueError("special token ids must be distinct and below vocab_size")
    regular, merges = _regular_tokens(vocab_size - len(special_tokens))
    vocab: dict[str, int] = {}
    regular_iter = iter(regular)
    by_id = {token_id: token for token, token_id in special_tokens.items()}
    for token_id in range(vocab_size):
        vocab[by_id[token_id] if token_id in by_id else next(regular_iter)] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # The specials already have their ids in the vocabulary; this only marks them special (never split, skipped
    # on decode with skip_special_tokens).
    tok.add_special_tokens(list(special_tokens))
    return tok
