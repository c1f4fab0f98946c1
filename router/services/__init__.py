"""The rest of a modality's traffic (README, "Query/Retrieve, worklist and MPPS"):
what the ingest answers besides C-STORE, C-ECHO and storage commitment.

* :mod:`.find`: C-FIND relayed to the Q/R sources (merged) and the worklist source;
* :mod:`.retrieve`: C-MOVE (the router takes the instances from a source and sends
  them to the Move Destination itself) and C-GET (back on the caller's association);
* :mod:`.mpps`: N-CREATE and N-SET relayed to every ``mpps.forward`` destination,
  in order, kept durably while one cannot be reached;
* :mod:`.sources`: associations to the peers the services ask;
* :mod:`.identifiers`: data sets of queries decoded and encoded;
* :mod:`.registry`: which service answers which request, built from the config.

An operation runs on the association it came on as ``router/kernel/operation.py``
says; the ingest knows these services only by the protocol it declares
(``router.ingest.fastscp.Services``).
"""
