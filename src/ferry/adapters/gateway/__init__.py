"""The gateway: production traffic to the committed versions (an adapter: ASGI over the core)."""
