"""``python -m p3dmm.training ARGS``: the ``train`` command as a standalone program.

This is the entry point for ``torchrun --nproc_per_node=N -m p3dmm.training ARGS`` (DDP);
it takes the same arguments as ``p3dmm train``.
"""

import sys

from p3dmm.training.train_cli import main

sys.exit(main())
