"""``python -m moderation``: the same command line as the ``moderation`` script."""

from moderation.cli import main

main()
