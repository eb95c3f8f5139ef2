"""The gRPC service around the engine: the server (`app`, `serve`, `config`, `flags`),
the handlers (`servicer`, `codec`, `streaming`), and what guards them (`interceptors`,
`auth`, `admission`, `metrics`, `graph_store`)."""
