"""``python -m set_kernels <command>``: the same commands as the ``set-kernels`` script."""
from .cli import main

raise SystemExit(main())
