"""Built-in metric plugins (docs/science.md#metrics)."""
