"""One interceptor a file; :func:`services.rpc.server.default_interceptors` puts them in order."""
