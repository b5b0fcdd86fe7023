"""``python -m memory_store``: the trace store admin CLI (see ``memory_store.cli``)."""

import sys

from .cli import main

sys.exit(main())
