"""A training rank's entry point, started by torchrun: ``python -m tasks.train_worker JOB``.

A module of its own so that ``tasks.train`` is imported once under its own name in each rank (running
``-m tasks.train`` would load it a second time as ``__main__``).
"""

import sys

from tasks.train import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
