"""Proofs of finished rollouts: the validator's own method (one unbatched forward per rollout, checked
at every position), the reference, batched and prefix provers that must reproduce it bit for bit, and
the row-count measurement the prefix prover relies on.

Imports: `common`, `protocol` and `inference` (model loading and the model families' op sequences).
"""
