"""Reference inference runner and `k2conv verify` (not built yet)."""
