"""bench/: libra_worker's figures against their floors, measured in one run (see bench/run)."""
