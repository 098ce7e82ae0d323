"""A training rank's entry point, started by torchrun: ``python -m tasks.train_worker JOB``.

A module of its own so that ``tasks.train_ddp`` and the modules it imports are imported once under their
own names in each rank (running one of them with ``-m`` would load it a second time as ``__main__``).
"""

import sys

from tasks.train_ddp import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
