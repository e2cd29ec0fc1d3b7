"""Test support: real servers (upstreams, a JWKS endpoint), keys and certificates, and a
manager for real gateway processes (mitmdump with the chain, or `custody run`)."""
