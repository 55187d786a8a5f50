"""The command line: argument parsing and one thin module per command.

A command module imports only light modules at the top (argument definitions need no torch), and the
layers below inside its `run`, so `grail-pipeline --help` answers without loading torch or
transformers. No command module imports another; what two commands share lives in a layer below or
in `cli.arguments`.
"""
