"""The inference gateway: gRPC in, pure ingest and preprocessing, Triton out."""
