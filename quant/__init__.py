"""Block quantizers, the exact INT4→Q4_0 repack, and recipes that pick a type per tensor."""
