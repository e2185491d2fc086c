#!/usr/bin/env python3
"""Send one job to a libra_worker and print its reply: see libra_worker.client."""
import sys

from libra_worker.client import main

if __name__ == "__main__":
    sys.exit(main())
