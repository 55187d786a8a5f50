"""Generating completions: model references and loading, the engine interface, the reference (hf)
engine, and the fast engine with its scheduler, KV cache, model runner, CUDA graphs, sampler and
decode attention; `models/` holds one file per model family.

Imports: `common` and `protocol`. Knows nothing about proofs, windows or mining: an engine takes groups
of prompt ids and gives back completions.
"""
