"""Server reflection that ghz can use.

ghz resolves a method with FileContainingSymbol("medgate.v1.Inference.Classify"); Python's stock
reflection only finds messages and services, not methods (grpc/grpc#34743, bojand/ghz#419), so
it answers NOT_FOUND. We fall back from a method name to its service.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer


class MethodAwareReflectionServicer(ReflectionServicer):
    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if response.HasField("error_response") and "." in fully_qualified_name:
            service_name, _, method_name = fully_qualified_name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                return response
            if method_name in service.methods_by_name:
                return super()._file_containing_symbol(request, service_name)
        return response


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    names = [*service_names, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(MethodAwareReflectionServicer(names), server)
