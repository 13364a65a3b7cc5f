"""``python -m megatron_agg.compare``: one worker of ``megatron-agg compare`` (torchrun starts it)."""

import sys

from . import main

sys.exit(main())
