"""Generated from protos/loraplex/v1. Do not edit: run `make proto`."""
