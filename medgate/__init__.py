"""Generated gRPC/protobuf code for the medgate API (`make proto`); do not edit."""
