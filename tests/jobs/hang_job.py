"""torchrun job of tests/test_integration_common.py: every rank says it is up, then hangs."""

import sys
import time

print(f"rank up, output directory {sys.argv[1]}", flush=True)
time.sleep(3600)
