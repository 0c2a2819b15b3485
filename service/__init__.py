"""The dlmctl API service: Experiments over HTTP for callers with a bearer token, authorised by the cluster."""
