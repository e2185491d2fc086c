"""Real components for the tests: job servers, back-ends, the worker, a client.

Everything listens on 127.0.0.1, on a free port, with its files in a
temporary directory, and is stopped by whoever started it.
"""
