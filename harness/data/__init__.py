"""Corpus sources, tokenizer, probe task and batches."""
