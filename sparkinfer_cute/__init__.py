"""sparkinfer_cute: CuTe DSL kernels and a thin cuda-python runtime for local MoE LLM inference from GGUF files.

Layers (each uses only the ones below it; tests/test_layers.py checks every import): entry points (run, tokenize,
accuracy, bench, perf_model, kernels CLI) -> engine -> models/ (one GPU forward per architecture) -> kernels/ (CuTe
DSL) -> runtime/ (cuda-python) | reference/ (numpy) | tokenizer -> gguf/ (reader, configs, numpy dequant, synthetic
writer) -> errors. This file imports nothing, so every layer can import the package.
"""

__version__ = "0.1.0"
