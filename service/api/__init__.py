"""HTTP surfaces: the KServe v2 protocol and the gateway's own endpoints."""
