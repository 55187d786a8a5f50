"""A fleet: several workers (GPUs, machines) of one hotkey mining one window file per window through Redis.

What is here: the connection (`GRAIL_REDIS_URL`, one clear line when Redis is not there), the key names,
retries with back-off that say once that Redis is away, the fleet's shared context (clock, run seed,
checkpoint: the first worker publishes it, the others must match), claims on problem indices as leases,
signed groups stored as the caller's bytes, the leader lease, the shared per-window plan, heartbeats and
the fleet view, and the local spill for groups that could not reach Redis. One worker alone uses none of
it (no server needed).

Imports: `common` and `protocol` only (and the `redis` client). `mining` builds its daemon on these pieces.
"""
