"""``python -m restoreflow.app.bench ARGS`` = ``restoreflow bench ARGS``."""

from restoreflow.app.bench.command import main

main()
