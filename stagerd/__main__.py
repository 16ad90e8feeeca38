"""Allow ``python -m stagerd``."""

from stagerd.cli import main

main()
