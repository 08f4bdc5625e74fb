"""Expert-major relayout of GGUF files (the `k2conv relayout` stage; not built yet)."""
