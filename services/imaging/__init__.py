"""Pure image work shared by the gateway and the training code: no gRPC, no Triton."""
