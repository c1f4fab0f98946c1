"""The ingest SCP: accept associations, spool every C-STORE durably, queue it.

Two engines behind one shape — :mod:`router.ingest.fastscp` (the default, a
lean data path) and :mod:`router.ingest.pynetdicom_scp` (stock pynetdicom) —
sharing association acceptance, the structural check of datasets, and the
gate toward Redis. Built on :mod:`router.kernel`; never on the workers.
"""
