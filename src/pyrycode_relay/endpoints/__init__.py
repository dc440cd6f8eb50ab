"""The /v1/server, /v1/client and /healthz handlers that join transport and core."""
