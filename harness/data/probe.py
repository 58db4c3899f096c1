"""The long-range key-retrieval probe of docs/science.md#the-probe-task.

A codeword is shown after KEY text and must be recalled after QUERY text; in training the gap
between them is story text, in the fixed eval sets it is random filler token ids. The probe mask
marks the target position(s) of the codeword after QUERY.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from geobench.api import ProbeConfig, UsageError
from geobench.data.tokenizer import TextTokenizer

# The source's five (KEY, QUERY) pairs (docs/science.md#the-probe-task); the codeword replaces {c}.
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
    then selected from the vocabulary by the clean rule. Few shared syllables keep the merges spent
    on them small (about n + 160), leaving the rest of the vocabulary to the corpus."""
    consonants, vowels = "BDFGKLMNPRSTVZ", "AEIOU"
    words = sorted(c1 + v1 + c2 + v2 for c1 in consonants for v1 in vowels for c2 in consonants for v2 in vowels)
    return sorted(random.Random(seed).sample(words, min(len(words), n_codewords + n_codewords // 4 + 16)))


def select_codewords(tok: TextTokenizer, cfg: ProbeConfig) -> list[str]:
    """The codewords of `cfg.codewords`'s rule: `clean_codewords` or `source_codewords`."""
    if cfg.codewords == "source":
        return source_codewords(tok, cfg.n_codewords, cfg.codeword_seed)
    return clean_codewords(tok, cfg.n_codewords, cfg.codeword_seed, cfg.codeword_min_chars)


def clean_codewords(tok: TextTokenizer, n: int, seed: int, min_chars: int = 4) -> list[str]:
    """Uppercase alphabetic strings of >= `min_chars` characters that encode (after a space, as in
    the templates) to a single token; sorted, shuffled with a fixed seed, the first `n` kept."""
    found = []
    for token_id in range(tok.vocab_size):
        text = tok.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and len(word) >= min_chars and word.isascii() and word.isalpha() and word.isupper():
            if tok.encode(" " + word) == [token_id]:
                found.append(word)
    found.sort()
    if len(found) < n:
        raise UsageError(f"the tokenizer has only {len(found)} single-token codewords of >= {min_chars} letters; "
                         f"probe.n_codewords={n} needs more (lower probe.codeword_min_chars or probe.n_codewords, "
                         "or raise data.vocab_size)")
    random.Random(seed).shuffle(found)
    return found[:n]


# the source's list of extra codewords, allowed two tokens (facts of its rule, docs/FIDELITY.md)
SOURCE_EXTRAS = tuple("""ALPHA BETA GAMMA DELTA OMEGA SIGMA THETA ZERO HERO KING QUEEN STAR MOON SUN FIRE WATER
    EARTH WIND STORM LIGHT DARK RED BLUE GREEN GOLD SILVER BLACK WHITE NORTH SOUTH EAST WEST DAWN DUSK NOON APPLE
    BERRY CANDY DOVE EAGLE FROST GHOST HAWK IVORY JADE KELP LEMON MAPLE NIGHT OLIVE PEARL QUARTZ ROSE STONE TIGER
    UNITY VIOLET WHALE XENON YARN ZEBRA""".split())


def source_codewords(tok: TextTokenizer, n: int, seed: int) -> list[str]:
    """The source's codeword rule, duplicates included (docs/FIDELITY.md): every vocabulary entry
    (its byte-level spelling, leading `Ġ`s and spaces stripped) that is uppercase, alphabetic, of
    >= 4 characters and one token WITHOUT a leading space, once per entry; when fewer than `n`,
    then those of >= 3 characters that are one token WITH a leading space and not found yet; then
    the extras that are at most two tokens. Sorted, shuffled by Python's `random` with `seed`, the
    first `n` kept — fewer when fewer were found, as the source did."""
    spellings = [entry.lstrip("Ġ ").strip() for entry in tok.tokenizer.get_vocab()]

    def upper_word(text: str, shortest: int) -> bool:
        return text.isupper() and text.isalpha() and len(text) >= shortest

    found = [w for w in spellings if upper_word(w, 4) and len(tok.encode(w)) == 1]
    if len(found) < n:
        seen = set(found)
        for w in spellings:
            if w not in seen and upper_word(w, 3) and len(tok.encode(" " + w)) == 1:
                found.append(w)
                seen.add(w)
    found += [w for w in SOURCE_EXTRAS if w not in found and len(tok.encode(w)) <= 2]
    found.sort()
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
    """KEY and QUERY token ids of every (template, codeword) pair and how many of QUERY's last
    tokens the probe mask covers. `clean`: KEY and QUERY follow story text (a leading space), the
    codeword is its one token and the mask covers it. `source`: each string is encoded on its own,
    as the source did, and the mask covers the last len(encode(word)) query tokens, the word encoded
    without the space it has in the query."""

    def __init__(self, cfg: ProbeConfig, tok: TextTokenizer, codewords: list[str]):
        self.cfg = cfg
        self.eos = tok.eos_id
        self.codewords = codewords
        self.code_index = np.arange(len(codewords))
        self.pairs: list[list[tuple[list[int], list[int], int]]] = []
        if cfg.codewords == "source":
            masked = [len(tok.encode(w)) for w in codewords]
            for key, query in TEMPLATES:
                self.pairs.append([(tok.encode(key.format(c=w)), tok.encode(query.format(c=w)), k)
                                   for w, k in zip(codewords, masked)])
            code_ids = np.unique([i for w in codewords for i in tok.encode(w)])
        else:
            code_ids = np.array([tok.encode(" " + w)[0] for w in codewords], dtype=np.int64)
            for key, query in TEMPLATES:
                key_pre, key_post = (" " + key).split("{c}")
                query_pre = tok.encode((" " + query).split("{c}")[0].rstrip())
                before, after = tok.encode(key_pre.rstrip()), tok.encode(key_post)
                self.pairs.append([(before + [c] + after, query_pre + [c], 1) for c in code_ids.tolist()])
        self.code_ids = code_ids  # the codewords' tokens (clean: the one token of each, in order)
        lo, hi = cfg.filler_ids
        hi = min(hi, tok.vocab_size - 1)
        # the clean probe keeps codeword tokens out of the eval filler; the source drew any id of the range
        excluded = np.append(code_ids, self.eos) if cfg.codewords == "clean" else np.array([self.eos])
        filler = np.setdiff1d(np.arange(lo, hi + 1), excluded)
        if filler.size == 0:
            raise UsageError(f"probe.filler_ids={cfg.filler_ids} leaves no filler tokens in a vocabulary of {tok.vocab_size}")
        self.filler = filler

    def describe(self) -> str:
        """The probe variant, as the report and the console state it."""
        if self.cfg.codewords == "source":
            return (f"source codewords ({len(self.codewords)}, {len(set(self.codewords))} distinct); mask: the last "
                    "len(encode(word)) query tokens, as the source's")
        return (f"clean codewords ({len(self.codewords)}, one token each after a space, >= "
                f"{self.cfg.codeword_min_chars} letters); mask: that token")

    def pair(self, template: int, code: int) -> tuple[list[int], list[int], int]:
        """Token ids of KEY and of QUERY (which ends with codeword `code`) and the number of QUERY's
        last tokens the probe mask covers."""
        return self.pairs[template][code]

    def inject(self, story: np.ndarray, length: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int] | None:
        """The probe sequence of docs/science.md#the-probe-task, built from the START of `story` (its tokens, EOS appended):
        story[:P] + KEY + story[P:P+gap] + QUERY + story[P+gap:], cut to `length` tokens, with
        budget = length − (|KEY| + gap + |QUERY|) and P uniform in 2..max(3, budget // 3), capped at
        the story's text length. Where the story runs out (inside the gap or after QUERY) EOS pads.

        Returns (tokens, pad, index of QUERY's last token, number of QUERY's last tokens masked),
        `pad` marking padding positions (no target); None when budget < 10 (the caller falls back to
        a plain LM window)."""
        key, query, masked = self.pair(int(rng.integers(len(TEMPLATES))), int(rng.choice(self.code_index)))
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
        return seq, pad, prefix + len(key) + gap + len(query) - 1, masked

    def eval_set(self, ood: bool, context: int) -> EvalSet:
        """The fixed eval sets of docs/science.md#the-probe-task: filler prefix, KEY, filler gap, QUERY; EOS padding after."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.codeword_seed, 1 if ood else 0])
        gap_lo, gap_hi = cfg.ood_gap if ood else cfg.train_gap
        seqs, templates, masks = [], [], []
        for _ in range(cfg.eval_examples):
            templates.append(int(rng.integers(len(TEMPLATES))))
            key, query, masked = self.pair(templates[-1], int(rng.choice(self.code_index)))
            masks.append(masked)
            prefix = rng.choice(self.filler, int(rng.integers(cfg.eval_prefix[0], cfg.eval_prefix[1] + 1)))
            gap = rng.choice(self.filler, int(rng.integers(gap_lo, gap_hi + 1)))
            seqs.append(np.concatenate([prefix, key, gap, query]).astype(np.int64))
        longest = max(len(s) for s in seqs)
        if longest > context:
            raise UsageError(f"probe eval examples need {longest} tokens but model.context={context}; "
                             f"lower probe.{'ood_gap' if ood else 'train_gap'} or raise model.context")
        # lm_ood=source counts the padding as LM targets: up to the full context, as the source padded
        width = context if cfg.lm_ood == "source" else longest
        inputs = np.full((len(seqs), width), self.eos, dtype=np.int64)
        targets = np.full((len(seqs), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=bool)
        padding = np.zeros((len(seqs), width), dtype=bool)
        for i, (seq, masked) in enumerate(zip(seqs, masks)):
            n = len(seq) - 1
            inputs[i, :n + 1], targets[i, :n] = seq, seq[1:]
            mask[i, max(n - masked, 0):n] = True
            padding[i, n:] = True
        return EvalSet(inputs, targets, mask, np.array(templates), padding)

