"""The foundation every layer stands on: the one user-error type, where caches live, atomic files.

Imports: the standard library only. Nothing here knows about models, the protocol or mining.
"""
