"""A training rank's entry point, started by torchrun: ``python -m tasks.train_worker JOB``.

A module of its own so that ``tasks.distributed`` and ``tasks.train`` are imported once under their own
names in each rank (running either with ``-m`` would load it a second time as ``__main__``).
"""

import sys

from tasks.distributed import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
