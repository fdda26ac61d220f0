"""The gRPC runtime: the server side (GrpcRuntime, start_server) and the client process (RemoteClient)."""
