"""Reading Hugging Face Kimi checkpoints and writing deepseek2 GGUF files."""
