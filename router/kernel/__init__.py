"""The kernel every part of the router stands on: configuration, the spool,
the queues, the error tree, DICOM statuses and wire vocabulary, file meta.

It imports nothing of the router above it (the ingest, the workers, the
command line); only :mod:`rules`, for the schema of the rules it validates.
"""
