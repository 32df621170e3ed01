"""The one gRPC layer every medgate server uses: interceptors, the status table, the server lifecycle.

Servicers only translate between protobuf and domain calls and raise domain errors; everything that
concerns every call (request ids, the access log, status codes, deadlines, request validation,
metrics, and later TLS, tokens and roles) is an interceptor in ``services/rpc/interceptors/``, one
file each, put in order by :func:`services.rpc.server.default_interceptors`.
"""
