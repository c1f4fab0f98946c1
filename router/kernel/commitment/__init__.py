"""Storage Commitment Push Model (PS3.4 Annex J), both directions, in one place.

* :mod:`.messages`: the N-ACTION and N-EVENT-REPORT data sets, encoded and
  decoded the same way whichever side the router plays;
* :mod:`.to_destinations`: the router as SCU, asking a destination to commit
  what it stored: each transaction recorded on disk before its N-ACTION,
  settled by the destination's report wherever it comes (on the sending
  association or a new one to the ingest); ``workers/commitment_to_destinations.py``
  sends the N-ACTIONs over the forwarding worker's association;
* :mod:`.from_modalities`: the router as SCP, telling a modality what it may
  delete: its requests kept on disk, decided from each instance's history
  (``router/kernel/history.py``), reported on its association or a new one;
* :mod:`.service`: the ingest's one entry for both messages as they arrive
  on its associations (a destination's report, a modality's request).

The command sets are ``router/kernel/dimse.py``'s, the associations the
kernel's upper layer (``router/kernel/pdu.py``, ``requestor.py``). See
docs/commitment.md.
"""
