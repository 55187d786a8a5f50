"""The miner: the messages that travel through the pipeline, the anyio pipeline stages, the simulated
chain and problem source, scoring and signing, the window sink, the daemon and its status file, and
`Runtime`, which assembles a model, engines, provers and signers from one set of choices.

Imports: `common`, `protocol`, `inference` and `proving`. Data flows one way: chain clock → problems
→ generation → proof → signing → sink → file.
"""
