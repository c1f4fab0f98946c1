"""The web dashboard: a FastAPI app serving the JSON API (``api.py``), its pages and ``/metrics``."""
