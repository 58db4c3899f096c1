"""Corpus sources, all read through `datasets`: the Hugging Face hub, local files, or the
embedded synthetic story corpus. A named source that cannot be loaded is an error, never a
silent fallback; the returned `Corpus` says exactly what was read."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import datasets

from geobench.api import DataConfig, UsageError
from geobench.data import synthetic

EMBEDDED = "embedded"
STORY_SEPARATOR = "<|endoftext|>"
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
ALTERNATIVES = "use local files (data=path/to/TinyStories) or the embedded corpus (data=embedded)"


@dataclasses.dataclass
class Corpus:
    kind: str  # "embedded", "hub" or "local"
    source: str
    description: str
    train: list[str]
    val: list[str]
    files: list[str] = dataclasses.field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        for split in (self.train, self.val):
            digest.update(str(len(split)).encode())
            for text in split:
                digest.update(text.encode("utf-8", "surrogatepass"))
                digest.update(b"\0")
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        return {"kind": self.kind, "source": self.source, "description": self.description,
                "train_stories": len(self.train), "val_stories": len(self.val),
                "files": self.files, "fingerprint": self.fingerprint}


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.source == EMBEDDED:
        return _embedded(cfg)
    path = Path(cfg.source).expanduser()
    if path.exists():
        datasets.disable_progress_bars()  # "Generating train split" bars would precede an error's one line
        try:
            return _local(path, cfg)
        finally:
            datasets.enable_progress_bars()
    if _looks_like_path(cfg.source):
        raise UsageError(f"data path {cfg.source!r} does not exist; {ALTERNATIVES}")
    return _hub(cfg)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in BUILDERS or source.count("/") != 1


def _select(split: datasets.Dataset, n: int, min_chars: int) -> list[str]:
    """The first `n` stories of a split with at least `min_chars` characters (after stripping)."""
    out: list[str] = []
    for batch in split.iter(batch_size=1000):
        for text in batch["text"]:
            text = (text or "").strip()
            if len(text) >= min_chars:
                out.append(text)
                if len(out) == n:
                    return out
    return out


def _embedded(cfg: DataConfig) -> Corpus:
    train = datasets.Dataset.from_dict({"text": synthetic.generate(cfg.train_stories, seed=1)})
    val = datasets.Dataset.from_dict({"text": synthetic.generate(cfg.val_stories, seed=2)})
    train_texts = _select(train, cfg.train_stories, cfg.min_chars)
    val_texts = _select(val, cfg.val_stories, cfg.min_chars)
    return Corpus(EMBEDDED, EMBEDDED,
                  f"embedded synthetic stories ({len(train_texts)} train / {len(val_texts)} validation)",
                  train_texts, val_texts)


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def require_hub(what: str) -> None:
    """Fail within seconds, naming the alternatives, when the hub cannot be reached.

    Skipped under HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1, where the cache answers."""
    if any(os.environ.get(var, "") in ("1", "true", "True") for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    host = _hub_host()
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Hugging Face hub ({host}: {exc.strerror or exc}) to load "
            f"{what!r}; {ALTERNATIVES}, or set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None


def _hub(cfg: DataConfig) -> Corpus:
    require_hub(cfg.source)
    try:
        ds = datasets.load_dataset(cfg.source)
    except Exception as exc:  # datasets raises many types for a missing or unreadable dataset
        raise UsageError(f"cannot load hub dataset {cfg.source!r}: {str(exc).splitlines()[0]}; {ALTERNATIVES}") from None
    train, val = _splits(ds, cfg, cfg.source)
    return Corpus("hub", cfg.source, f"Hugging Face hub dataset {cfg.source} "
                  f"({len(train)} train / {len(val)} validation)", train, val)


def _is_validation(path: Path) -> bool:
    words = {w for part in path.parts[-2:] for w in part.lower().replace("-", "_").replace(".", "_").split("_")}
    return bool(words & {"validation", "valid", "val", "dev"})


def _local_files(path: Path) -> dict[str, list[str]]:
    """Train/validation data files under `path`, of the first format found (parquet > jsonl > txt)."""
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise UsageError(f"data file {str(path)!r} has an unsupported type; use .txt, .jsonl, .json or .parquet")
        return {"train": [str(path)]}
    for suffix in (".parquet", ".jsonl", ".json", ".txt"):
        found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if found:
            split = {"train": [str(p) for p in found if not _is_validation(p)],
                     "validation": [str(p) for p in found if _is_validation(p)]}
            return {k: v for k, v in split.items() if v}
    raise UsageError(f"no .parquet, .jsonl, .json or .txt files under {str(path)!r}")


def _local(path: Path, cfg: DataConfig) -> Corpus:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise UsageError(f"cannot load saved dataset {str(path)!r}: {str(exc).splitlines()[0]}") from None
        files = [str(path)]
        kind = "saved dataset"
    else:
        data_files = _local_files(path)
        if not data_files.get("train"):
            raise UsageError(f"no training files under {str(path)!r} (only validation files were found)")
        builder = BUILDERS[Path(data_files["train"][0]).suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, **kwargs)
        except Exception as exc:
            raise UsageError(f"cannot read data files under {str(path)!r}: {str(exc).splitlines()[0]}") from None
        if builder == "text":
            ds = ds.map(_split_documents, batched=True)
        files = [f for split in data_files.values() for f in split]
        kind = builder
    train, val = _splits(ds, cfg, str(path))
    return Corpus("local", str(path), f"local {kind} files {path} ({len(train)} train / {len(val)} validation)",
                  train, val, files)


def _split_documents(batch: dict) -> dict:
    """A whole .txt file → its stories: separated by <|endoftext|> lines, else by blank lines."""
    stories: list[str] = []
    for document in batch["text"]:
        pieces = document.split(STORY_SEPARATOR) if STORY_SEPARATOR in document else document.split("\n\n")
        stories.extend(p.strip() for p in pieces if p.strip())
    return {"text": stories}


def _splits(ds, cfg: DataConfig, where: str) -> tuple[list[str], list[str]]:
    """Train and validation stories of a Dataset or DatasetDict. Without a validation split the
    last `val_stories` selected stories of train are held out."""
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if "train" not in ds:
        raise UsageError(f"{where!r} has no 'train' split (splits: {', '.join(ds)})")
    for split in ds.values():
        if "text" not in split.column_names:
            raise UsageError(f"{where!r} has no 'text' column (columns: {', '.join(split.column_names)})")
    val_split = next((ds[name] for name in ("validation", "valid", "val", "test") if name in ds), None)
    if val_split is not None:
        train = _select(ds["train"], cfg.train_stories, cfg.min_chars)
        val = _select(val_split, cfg.val_stories, cfg.min_chars)
    else:
        stories = _select(ds["train"], cfg.train_stories + cfg.val_stories, cfg.min_chars)
        if len(stories) < 2:
            raise UsageError(f"{where!r} holds fewer than 2 stories of at least {cfg.min_chars} characters")
        n_val = min(cfg.val_stories, len(stories) // 2)
        train, val = stories[:-n_val], stories[-n_val:]
    if not train or not val:
        raise UsageError(f"{where!r} has no stories of at least {cfg.min_chars} characters in one of its splits")
    return train, val
