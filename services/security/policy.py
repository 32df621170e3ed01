"""Which roles may call which RPC: every RPC of every medgate service is listed, and anything unlisted is refused.

A new RPC that nobody adds here answers PERMISSION_DENIED to everyone, so it cannot ship open by
accident (``tests/test_security_matrix.py`` enumerates the service descriptors against this table).
Health checks are always open (load balancers probe without tokens); reflection is open unless
``security.reflection_requires_token``.
"""

from __future__ import annotations

from services.security.identity import Role

_INFERENCE = frozenset({Role.INFERENCE})
_REVIEW = frozenset({Role.REVIEWER, Role.ADMIN})
_ADMIN = frozenset({Role.ADMIN})

RPC_ROLES: dict[str, frozenset[str]] = {
    "/medgate.v1.Inference/Classify": _INFERENCE,
    "/medgate.v1.Inference/Detect": _INFERENCE,
    "/medgate.v1.Inference/Segment": _INFERENCE,
    "/medgate.v1.Inference/Analyze": _INFERENCE,
    "/medgate.v1.Inference/AnalyzeStream": _INFERENCE,
    "/medgate.v1.Report/Impression": _INFERENCE,
    "/medgate.v1.Report/ImpressionStream": _INFERENCE,
    "/medgate.v1.Review/DescribeFlowDefinition": _REVIEW,
    "/medgate.v1.Review/ListFlowDefinitions": _REVIEW,
    "/medgate.v1.Review/StartHumanLoop": frozenset({Role.ROUTER, Role.ADMIN}),
    "/medgate.v1.Review/DescribeHumanLoop": _REVIEW,
    "/medgate.v1.Review/ListHumanLoops": _ADMIN,
    "/medgate.v1.Review/StopHumanLoop": _ADMIN,
    "/medgate.v1.Review/DeleteHumanLoop": _ADMIN,
    "/medgate.v1.Review/StreamCases": _REVIEW,
    "/medgate.v1.Review/SubmitReview": _REVIEW,
    "/medgate.v1.Review/ReleaseCase": _REVIEW,
    "/medgate.v1.Review/RenewLease": _REVIEW,
}

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
REFLECTION_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


def roles_for(full_method: str) -> frozenset[str]:
    """The roles that may call ``/package.Service/Method``; empty for an RPC nobody may call."""
    return RPC_ROLES.get(full_method, frozenset())
