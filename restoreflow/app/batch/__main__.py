"""``python -m restoreflow.app.batch ARGS`` = ``restoreflow batch ARGS`` (for ``torchrun -m``)."""

from restoreflow.app.batch.command import main

main()
