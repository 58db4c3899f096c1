"""The long-range key-retrieval probe of SPEC §2.

A codeword is shown after KEY text and must be recalled after QUERY text; in training the gap
between them is story text, in the fixed eval sets it is random filler token ids. The probe mask
marks the target position(s) of the codeword after QUERY.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from geobench.config import ProbeConfig
from geobench.data.tokenizer import TextTokenizer
from geobench.errors import UsageError

# The source's five (KEY, QUERY) pairs (SPEC §2); the codeword replaces {c}.
TEMPLATES = [
    ("The secret code is {c}.", "What is the secret code? {c}"),
    ("Remember the word {c}.", "What was the word? {c}"),
    ("The special word is {c}.", "What is the special word? {c}"),
    ("The password is {c}.", "What is the password? {c}"),
    ("The magic word is {c}.", "The magic word was {c}"),
]
MIN_BUDGET = 10  # fewer story tokens than this beside KEY, gap and QUERY: a plain LM window instead
IGNORE = -1  # target id of positions that carry no loss


def codeword_pool(n_codewords: int, seed: int = 0) -> list[str]:
    """Uppercase pseudo-words (consonant-vowel-consonant-vowel) offered to BPE training so that
    they become single tokens; a quarter more than needed, since the codewords themselves are
    then selected from the vocabulary by SPEC's rule. Few shared syllables keep the merges spent
    on them small (about n + 160), leaving the rest of the vocabulary to the corpus."""
    consonants, vowels = "BDFGKLMNPRSTVZ", "AEIOU"
    words = sorted(c1 + v1 + c2 + v2 for c1 in consonants for v1 in vowels for c2 in consonants for v2 in vowels)
    return sorted(random.Random(seed).sample(words, min(len(words), n_codewords + n_codewords // 4 + 16)))


def select_codewords(tok: TextTokenizer, n: int, seed: int) -> list[str]:
    """Uppercase alphabetic strings of >= 4 characters that encode (after a space, as in the
    templates) to a single token; sorted, shuffled with a fixed seed, the first `n` kept."""
    found = []
    for token_id in range(tok.vocab_size):
        text = tok.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and len(word) >= 4 and word.isascii() and word.isalpha() and word.isupper():
            if tok.encode(" " + word) == [token_id]:
                found.append(word)
    found.sort()
    if len(found) < n:
        raise UsageError(f"the tokenizer has only {len(found)} single-token codewords; "
                         f"probe.n_codewords={n} needs more (raise data.vocab_size or lower probe.n_codewords)")
    random.Random(seed).shuffle(found)
    return found[:n]


@dataclasses.dataclass
class EvalSet:
    """Fixed probe examples: inputs, targets (IGNORE where no loss) and the probe mask."""

    inputs: np.ndarray   # (N, L) int64: the example (codeword included), then EOS padding
    targets: np.ndarray  # (N, L) int64
    mask: np.ndarray     # (N, L) bool
    templates: np.ndarray | None = None  # (N,) index of the KEY/QUERY template of each example
    padding: np.ndarray | None = None    # (N, L) bool: targets that are EOS padding (IGNORE in `targets`)

    def padded_targets(self, eos: int) -> np.ndarray:
        """`targets` with EOS at the padding positions: the source's eval sets counted them as LM targets."""
        return np.where(self.padding, eos, self.targets) if self.padding is not None else self.targets


class ProbeTask:
    def __init__(self, cfg: ProbeConfig, tok: TextTokenizer, codewords: list[str]):
        self.cfg = cfg
        self.eos = tok.eos_id
        self.codewords = codewords
        self.code_ids = np.array([tok.encode(" " + w)[0] for w in codewords], dtype=np.int64)
        self.keys = []
        for key, query in TEMPLATES:
            key_pre, key_post = (" " + key).split("{c}")
            query_pre = (" " + query).split("{c}")[0]
            self.keys.append((tok.encode(key_pre.rstrip()), tok.encode(key_post), tok.encode(query_pre.rstrip())))
        lo, hi = cfg.filler_ids
        hi = min(hi, tok.vocab_size - 1)
        filler = np.setdiff1d(np.arange(lo, hi + 1), np.append(self.code_ids, self.eos))
        if filler.size == 0:
            raise UsageError(f"probe.filler_ids={cfg.filler_ids} leaves no filler tokens in a vocabulary of {tok.vocab_size}")
        self.filler = filler

    def pair(self, template: int, code: int) -> tuple[list[int], list[int]]:
        """Token ids of KEY and of QUERY (the latter ends with the codeword, the probe target)."""
        key_pre, key_post, query_pre = self.keys[template]
        return key_pre + [code] + key_post, query_pre + [code]

    def inject(self, story: np.ndarray, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int] | None:
        """SPEC §2's probe sequence, built from the START of `story` (its tokens, EOS appended):
        story[:P] + KEY + story[P:P+gap] + QUERY + story[P+gap:], cut to `length` tokens, with
        budget = length − (|KEY| + gap + |QUERY|) and P uniform in 2..max(3, budget // 3), capped at
        the story's text length. Where the story runs out (inside the gap or after QUERY) EOS pads.

        Returns (tokens, pad, index of the codeword after QUERY), `pad` marking padding positions
        (no target); None when budget < 10 (the caller falls back to a plain LM window)."""
        key, query = self.pair(int(rng.integers(len(TEMPLATES))), int(rng.choice(self.code_ids)))
        gap = int(rng.integers(self.cfg.train_gap[0], self.cfg.train_gap[1] + 1))
        budget = length - (len(key) + gap + len(query))
        if budget < MIN_BUDGET:
            return None
        prefix = min(int(rng.integers(2, max(3, budget // 3) + 1)), len(story) - 1)
        padded = np.concatenate([story, np.full(length, self.eos, dtype=story.dtype)])
        is_pad = np.arange(len(padded)) >= len(story)
        parts = [(padded[:prefix], is_pad[:prefix]), (np.asarray(key), np.zeros(len(key), bool)),
                 (padded[prefix:prefix + gap], is_pad[prefix:prefix + gap]),
                 (np.asarray(query), np.zeros(len(query), bool)),
                 (padded[prefix + gap:], is_pad[prefix + gap:])]
        seq = np.concatenate([t for t, _ in parts])[:length].astype(np.int64)
        pad = np.concatenate([m for _, m in parts])[:length]
        return seq, pad, prefix + len(key) + gap + len(query) - 1

    def eval_set(self, ood: bool, context: int) -> EvalSet:
        """SPEC §2's fixed eval sets: filler prefix, KEY, filler gap, QUERY; EOS padding after."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.codeword_seed, 1 if ood else 0])
        gap_lo, gap_hi = cfg.ood_gap if ood else cfg.train_gap
        seqs, templates = [], []
        for _ in range(cfg.eval_examples):
            templates.append(int(rng.integers(len(TEMPLATES))))
            key, query = self.pair(templates[-1], int(rng.choice(self.code_ids)))
            prefix = rng.choice(self.filler, int(rng.integers(cfg.eval_prefix[0], cfg.eval_prefix[1] + 1)))
            gap = rng.choice(self.filler, int(rng.integers(gap_lo, gap_hi + 1)))
            seqs.append(np.concatenate([prefix, key, gap, query]).astype(np.int64))
        longest = max(len(s) for s in seqs)
        if longest > context:
            raise UsageError(f"probe eval examples need {longest} tokens but model.context={context}; "
                             f"lower probe.{'ood_gap' if ood else 'train_gap'} or raise model.context")
        inputs = np.full((len(seqs), longest), self.eos, dtype=np.int64)
        targets = np.full((len(seqs), longest), IGNORE, dtype=np.int64)
        mask = np.zeros((len(seqs), longest), dtype=bool)
        padding = np.zeros((len(seqs), longest), dtype=bool)
        for i, seq in enumerate(seqs):
            n = len(seq) - 1
            inputs[i, :n + 1], targets[i, :n] = seq, seq[1:]
            mask[i, n - 1] = True
            padding[i, n:] = True
        return EvalSet(inputs, targets, mask, np.array(templates), padding)

