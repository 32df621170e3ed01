"""Who is calling and what they may do: identities from tokens and certificates, roles, credentials, audit.

Pure modules (no gRPC); the RPC layer's auth interceptor (``services/rpc/interceptors/auth.py``) uses them.
"""
