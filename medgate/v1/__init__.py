"""medgate.v1: generated from proto/medgate/v1 by `make proto`."""
