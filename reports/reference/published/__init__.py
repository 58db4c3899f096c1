"""The source study's published output series, shipped as package data (see mini_gpt/PROVENANCE.md)."""
