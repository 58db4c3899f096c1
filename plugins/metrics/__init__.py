"""Built-in metric plugins (SPEC §4)."""
