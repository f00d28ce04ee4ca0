"""Generated gRPC contracts (protos/loraplex). Do not edit: run `make proto`."""
