"""Exit codes the router's processes share with whoever starts them."""

EXIT_CANNOT_LISTEN = 78
"""EX_CONFIG (sysexits.h): the ingest cannot bind its port; restarting will not help, so `run` gives up."""
