"""What an operator runs around the miner: the benchmark's measurement and report, the calibration
sweep and its file, the scoring-window projection, the PM2 ecosystem renderer and the window-file check.

Imports: every layer below (`common`, `protocol`, `inference`, `proving`, `mining`), never `cli`.
"""
