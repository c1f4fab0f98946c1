"""The ingest SCP: accept associations, spool every C-STORE durably, queue it.

:mod:`router.ingest.server` listens and keeps the limits;
:mod:`router.ingest.fastscp` is each accepted association on the router's
own upper layer (``router/kernel/pdu.py``, ``reader.py``, ``dimse.py``);
:mod:`router.ingest.store` decides what a C-STORE is answered;
:mod:`router.ingest.validate` checks a data set's structure;
:mod:`router.ingest.redis_gate` queues what was made durable. Built on
:mod:`router.kernel`; never on the workers.
"""
