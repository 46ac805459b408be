"""sparkinfer_cute: CuTe DSL kernels and a thin cuda-python runtime for local MoE LLM inference from GGUF files.

Layers (each uses only the ones below it): entry points (run, tokenize, accuracy, bench, kernels CLI) -> engine ->
models/ (one GPU forward per architecture) -> kernels/ (CuTe DSL) + runtime/ (cuda-python) + tokenizer + reference/
(numpy) -> gguf/ (reader, configs, numpy dequant, synthetic writer).
"""

__version__ = "0.1.0"
