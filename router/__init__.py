"""dicom-router: receive DICOM, keep it durably, route it by rules, forward it."""

import os

# pydicom imports numpy, whose OpenBLAS starts a thread per core that spins
# for a while after start: ~0.1 s of CPU in each of a router's five processes
# (0.3 s of 2.6 s to start `run` on two cores), and a thread each for nothing.
# The router does no linear algebra; whoever wants the threads sets the variable.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
