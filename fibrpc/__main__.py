"""``python -m fibrpc``: the same as the ``fibrpc`` command."""

from fibrpc.cli import main

main()
