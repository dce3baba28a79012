"""A T5 tokenizer over a small word list, built in memory: the embedded model's and the tests' tiny models'."""

from __future__ import annotations


def word_tokenizer(words: list[str]):
    """A T5 (Unigram) tokenizer whose pieces are ``words``; unknown words fall back to single letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0), (",", -1.0)]
    vocab += [("▁" + word, -1.0) for word in words]
    vocab += [(letter, -10.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)
