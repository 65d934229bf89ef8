"""``python -m ncaudit``: the command line."""

from ncaudit.cli import main

main()
