import json
import time

import datasets
import numpy as np
import pytest
import torch

from geobench.api import DataConfig, ProbeConfig, UsageError
from geobench.data import synthetic
from geobench.data.batches import TrainStream, validation_batches
from geobench.data.corpus import load_corpus
from geobench.data.probe import IGNORE, TEMPLATES, ProbeTask, clean_codewords, codeword_pool
from geobench.data.tokenizer import load_tokenizer, tokenize_stories


def parse_txt(path):
    """Independent reading of a TinyStories .txt file."""
    return [s.strip() for s in path.read_text().split("<|endoftext|>") if s.strip()]


def test_embedded_corpus_is_deterministic_and_varied():
    a, b = synthetic.generate(200, seed=1), synthetic.generate(200, seed=1)
    assert a == b
    assert len(set(a)) == 200
    corpus = load_corpus(DataConfig(source="embedded", train_stories=100, val_stories=20))
    assert (corpus.kind, len(corpus.train), len(corpus.val)) == ("embedded", 100, 20)
    assert set(corpus.train).isdisjoint(corpus.val) or len(set(corpus.train) & set(corpus.val)) < 3
    assert "embedded" in corpus.description


def test_local_hub_layout_folder_prefers_parquet(shared_data):
    corpus = load_corpus(DataConfig(source=str(shared_data), train_stories=500, val_stories=100))
    assert corpus.kind == "local" and all(f.endswith(".parquet") for f in corpus.files)
    expected_train = parse_txt(shared_data / "train" / "tinystories-train-sample.txt")[:500]
    expected_val = parse_txt(shared_data / "validation" / "tinystories-validation-sample.txt")[:100]
    assert corpus.train == expected_train
    assert corpus.val == expected_val


def test_local_txt_file_and_folder(shared_data):
    val_file = shared_data / "validation" / "tinystories-validation-sample.txt"
    corpus = load_corpus(DataConfig(source=str(val_file), train_stories=300, val_stories=50))
    stories = parse_txt(val_file)
    # one file, no validation split: the last val_stories of the selection are held out
    assert corpus.train == stories[:300] and corpus.val == stories[300:350]

    folder = load_corpus(DataConfig(source=str(shared_data / "train"), train_stories=50, val_stories=10))
    assert len(folder.files) == 6 and folder.train[0] == parse_txt(shared_data / "train" / "tinystories-train-extra-01.txt")[0]


def test_min_chars_filter(tmp_path):
    path = tmp_path / "stories.jsonl"
    rows = [{"text": "short"}, {"text": "x" * 60}, {"text": "   "}, {"text": "y" * 45}, {"text": "z" * 80}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(DataConfig(source=str(path), train_stories=10, val_stories=1, min_chars=40))
    assert corpus.train == ["x" * 60, "y" * 45] and corpus.val == ["z" * 80]


def test_saved_dataset_directory(tmp_path):
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"train story number {i} " * 3 for i in range(30)]}),
        "validation": datasets.Dataset.from_dict({"text": [f"validation story {i} " * 4 for i in range(8)]}),
    })
    ds.save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(DataConfig(source=str(tmp_path / "saved"), train_stories=20, val_stories=5))
    assert corpus.train == [t.strip() for t in ds["train"]["text"][:20]]
    assert corpus.val == [t.strip() for t in ds["validation"]["text"][:5]]


def test_bad_sources_are_usage_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        load_corpus(DataConfig(source=str(tmp_path / "nope")))
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(UsageError, match="no .parquet, .jsonl, .json or .txt files"):
        load_corpus(DataConfig(source=str(tmp_path)))
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"story": "x" * 50}) + "\n")
    with pytest.raises(UsageError, match="no 'text' column"):
        load_corpus(DataConfig(source=str(bad)))


def test_unreachable_hub_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(UsageError, match=r"cannot reach the Hugging Face hub.*data=embedded"):
        load_corpus(DataConfig(source="roneneldan/TinyStories"))
    assert time.monotonic() - start < 10


@pytest.fixture(scope="module")
def real_text(shared_data):
    cfg = DataConfig(source=str(shared_data), train_stories=400, val_stories=40, vocab_size=3000)
    corpus = load_corpus(cfg)
    tok = load_tokenizer(cfg, corpus, codeword_pool(48))
    probe = ProbeTask(ProbeConfig(p_probe=1.0, n_codewords=48), tok, clean_codewords(tok, 48, seed=0))
    return cfg, corpus, tok, probe


def test_bpe_is_cached_and_codewords_are_single_tokens(real_text):
    cfg, corpus, tok, probe = real_text
    assert tok.kind == "bpe" and tok.vocab_size == 3000
    again = load_tokenizer(cfg, corpus, codeword_pool(48))
    assert again.fingerprint == tok.fingerprint
    for word in probe.codewords:
        assert word.isupper() and word.isalpha() and len(word) >= 4
        assert len(tok.encode(" " + word)) == 1
    assert probe.codewords == clean_codewords(tok, 48, seed=0)
    assert sorted(probe.codewords) != probe.codewords  # shuffled after sorting
    with pytest.raises(UsageError, match="single-token codewords"):
        clean_codewords(tok, 5000, seed=0)


def test_training_sequences_on_real_text(real_text):
    cfg, corpus, tok, probe = real_text
    stories = tokenize_stories(cfg, tok, corpus, "train")
    assert tok.decode(stories.story(3).tolist()) == corpus.train[3]
    stream = TrainStream(stories, probe, context=256, batch_size=4, grad_accum=2, p_probe=1.0, seed=42, eos=tok.eos_id)
    code_ids = set(probe.code_ids.tolist())
    injected = 0
    for index in range(60):
        x, y, mask = stream.sequence(index)
        assert x.shape == y.shape == mask.shape == (256,)
        valid = y != IGNORE
        np.testing.assert_array_equal(x[1:][valid[:-1]], y[:-1][valid[:-1]])  # targets are inputs shifted
        epoch, pos = divmod(index, len(stories))
        story = np.append(stories.story(int(stream._order(epoch)[pos])), tok.eos_id)
        if not mask.any():
            continue  # too little room: plain LM window
        injected += 1
        (j,) = np.flatnonzero(mask)
        code = int(y[j])
        assert code in code_ids
        seq = np.append(x[: j + 1], code)
        templates = [probe.pair(t, probe.code_ids.tolist().index(code)) for t in range(len(TEMPLATES))]
        key, query = next((k, q) for k, q, masked in templates if list(seq[-len(q):]) == q and masked == 1)
        start = next(i for i in range(len(seq)) if list(seq[i:i + len(key)]) == key)
        gap = len(seq) - len(query) - (start + len(key))
        assert 5 <= gap <= 30
        budget = 257 - (len(key) + gap + len(query))
        assert budget >= 10 and 2 <= start <= min(max(3, budget // 3), len(story) - 1)  # KEY near the START
        # the whole sequence, rebuilt from the story by the recipe of docs/science.md#the-probe-task, EOS where the story runs out
        padded = story.tolist() + [tok.eos_id] * 600
        real = [True] * len(story) + [False] * 600
        expected = padded[:start] + key + padded[start:start + gap] + query + padded[start + gap:]
        is_real = real[:start] + [True] * len(key) + real[start:start + gap] + [True] * len(query) + real[start + gap:]
        assert x.tolist() == expected[:256]
        # targets are the next tokens; past the story's own EOS (padding) they carry no loss
        assert y.tolist() == [t if ok else IGNORE for t, ok in zip(expected[1:257], is_real[1:257])]
    assert injected > 40
    # a batch is a pure function of (seed, step, micro): resume sees the same data
    a = stream.batch(7, 1)
    b = TrainStream(stories, probe, 256, 4, 2, 1.0, 42, tok.eos_id).batch(7, 1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_short_stories_are_padded_and_pad_targets_ignored(real_text):
    cfg, corpus, tok, probe = real_text
    stories = tokenize_stories(cfg, tok, corpus, "val")
    (x, y), = validation_batches(stories, context=512, n_batches=1, batch_size=1, eos=tok.eos_id)
    n = len(stories.story(0))
    assert y[0, n - 1] == tok.eos_id  # the story's end is a target
    assert (y[0, n:] == IGNORE).all() and (x[0, n:] == tok.eos_id).all()


@pytest.mark.parametrize("ood", [False, True])
def test_eval_sets_follow_spec(real_text, ood):
    cfg, corpus, tok, probe = real_text
    data = ProbeTask(ProbeConfig(eval_examples=50, n_codewords=48), tok, probe.codewords).eval_set(ood, context=256)
    lo, hi = (80, 200) if ood else (5, 30)
    code_ids = set(probe.code_ids.tolist())
    for x, y, mask, pad in zip(data.inputs, data.targets, data.mask, data.padding):
        (j,) = np.flatnonzero(mask)
        assert int(y[j]) in code_ids and (y[j + 1:] == IGNORE).all()
        assert x[j + 1] == y[j] and (x[j + 2:] == tok.eos_id).all()  # the codeword, then EOS padding
        assert not pad[:j + 1].any() and pad[j + 1:].all()  # the source counted these targets in lm_ood
        seq = np.append(x[: j + 1], y[j])
        code = probe.code_ids.tolist().index(int(y[j]))
        key, query = next((k, q) for k, q, _ in (probe.pair(t, code) for t in range(5)) if list(seq[-len(q):]) == q)
        start = next(i for i in range(len(seq)) if list(seq[i:i + len(key)]) == key)
        assert 2 <= start <= 10
        filler = np.concatenate([seq[:start], seq[start + len(key):len(seq) - len(query)]])
        assert lo <= len(filler) - start <= hi
        assert ((filler >= 100) & (filler <= 2999)).all() and not set(filler.tolist()) & code_ids
    again = ProbeTask(ProbeConfig(eval_examples=50, n_codewords=48), tok, probe.codewords).eval_set(ood, context=256)
    assert np.array_equal(again.inputs, data.inputs)  # fixed sets


def test_prefetched_batches_are_the_plain_batches(real_text):
    from geobench.data.batches import Prefetcher

    cfg, corpus, tok, probe = real_text
    stories = tokenize_stories(cfg, tok, corpus, "train")
    stream = TrainStream(stories, probe, context=64, batch_size=3, grad_accum=2, p_probe=0.5, seed=5, eos=tok.eos_id)
    prefetch = Prefetcher(stream, first=4, last=9, depth=2)
    got = list(prefetch)
    prefetch.close()
    plain = [stream.batch(step, micro) for step in range(4, 10) for micro in range(2)]
    assert len(got) == len(plain) == 12
    for a, b in zip(got, plain):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # closing before the end stops the worker (a run that diverges or is interrupted early)
    early = Prefetcher(stream, first=1, last=1000, depth=1)
    first = next(iter(early))
    early.close()
    assert not early.thread.is_alive() and all(torch.equal(u, v) for u, v in zip(first, stream.batch(1, 0)))

