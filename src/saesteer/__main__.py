"""`python -m saesteer` runs the CLI (also how torchrun launches it)."""

from saesteer.cli import main

main()
