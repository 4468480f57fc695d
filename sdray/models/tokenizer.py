"""Offline tokenizers for presets built without weights: a CLIP-style BPE one and a T5-style unigram one.

Nothing is fetched from a hub: the vocabulary holds every printable ASCII character (alone and as a
word end, ``c</w>``) and the merges that build a fixed list of words left to right, so any ASCII prompt
tokenizes and common caption words are single tokens. It is saved in ``CLIPTokenizer``'s own format, so
stock diffusers pipelines load it from ``tokenizer/``.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words made single tokens. Digits are split one by one by CLIP's pre-tokenizer, so they need no merges.
WORDS = (
    "a an the of and with in on photo picture image drawing painting handwritten digit number "
    "zero one two three four five six seven eight nine black white red green blue small large"
).split()


def _vocab_and_merges(words: tuple[str, ...] | list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab: dict[str, int] = {}
    for piece in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    # Longer words first: BPE applies the lowest-ranked merge, so a short word's merge ("a n") must not
    # outrank the first merges of a longer word that contains it ("h a" of "handwritten").
    for word in sorted(words, key=len, reverse=True):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_tokenizer(model_max_length: int = 16, words: tuple[str, ...] | list[str] = WORDS) -> CLIPTokenizer:
    """A small CLIPTokenizer made offline (pad = eos, as in Stable Diffusion 1.x)."""
    vocab, merges = _vocab_and_merges(words)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length, pad_token=EOS)
        # Load everything now: the files go away with the temporary directory.
        assert len(tok) == len(vocab)
    return tok


def build_t5_tokenizer(model_max_length: int = 32, words: tuple[str, ...] | list[str] = WORDS) -> T5TokenizerFast:
    """A small T5-style tokenizer made offline (SentencePiece unigram over the same words and every
    printable character, ``</s>`` appended, ``<pad>`` = 0), saved and loaded as stock ``T5TokenizerFast``
    (tokenizer.json), as SD3's and Flux's pipelines load theirs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    candidates = [("\u2581" + w, -1.0) for w in words] + [("\u2581", -3.0)]
    candidates += [(p, -5.0) for c in string.printable if not c.isspace() for p in (c, "\u2581" + c)]
    for piece, score in candidates:
        if piece not in seen:
            pieces.append((piece, score))
            seen.add(piece)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=model_max_length)
