"""Generated protobuf and gRPC stubs of the latenthash.v1 service (see proto/)."""
