"""`python -m medistill` runs the command-line interface."""

from medistill.cli import main

main()
