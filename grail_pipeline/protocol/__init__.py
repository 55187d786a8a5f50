"""What the GRAIL protocol says, as code: constants per version, SAT problems and rewards, the prompt
tokenizer, proof sketches and commitments, rollout records and window files, sr25519 signing.

Every rule a validator applies to a miner's output lives here, in one profile per protocol version.
Imports: `common` only (and numpy, torch for the sketch arithmetic, pyarrow, the wallet library). No
model, engine or mining code: a change of protocol is a change here and nowhere else.
"""
