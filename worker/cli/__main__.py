"""`python -m worker.cli`: the same as `invoice-worker`."""

from worker.cli.main import main

main()
