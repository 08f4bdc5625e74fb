"""Reference inference runner for Kimi K2-family models (needs torch: `pip install k2conv[runner]`).

- `dequant`: GGML block dequantization with torch, bit-identical to gguf.quants.dequantize.
- `weights`: mmap weight sources — GGUF (single or split, ours or llama.cpp's) and the HF checkpoint.
- `model`: the DeepSeek-V3 / Kimi forward pass (MLA with compressed KV cache, YaRN, sigmoid-routed MoE).
- `verify`: logit comparison (KLD, top-1, perplexity) of a converted model against its reference.

Nothing is imported here so that `import k2conv.infer` works without torch.
"""
