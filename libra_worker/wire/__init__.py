"""The project's own Gearman wire (binary protocol), hardened for a device daemon.

- packets: packet types, encoding, and an incremental reader with a size cap;
- backoff: reconnect delays (exponential, jittered, reset only after health);
- tls:     the TLS client context, built and checked when the settings load;
- link:    one non-blocking connection (connect, TLS, bounded buffers, deadlines);
- worker:  the worker side (CAN_DO, GRAB_JOB_UNIQ, PRE_SLEEP, ...), one event loop;
- client:  the client side (SUBMIT_JOB and the WORK_* answers), for bin/client.py.

Protocol: http://gearman.org/protocol/ (packets are "\\0REQ"/"\\0RES", a
big-endian type and size, then NUL-separated arguments).
"""
