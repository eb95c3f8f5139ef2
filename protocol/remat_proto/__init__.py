"""remat's protocol package: what the SDK (`remat`) and the server (`remat_server`)
both speak, defined once.

Pure modules, importable by any layer (no gRPC, no generated code):

- `dtypes`: the dtypes remat supports and their NumPy types;
- `units`: byte sizes, formatted and parsed;
- `policies`: the checkpoint policies, with their labels, string forms and wire kinds
  in one table;
- `results`: the metrics, planner report and trace events a run reports;
- `spec`: a graph as sent (inputs, nodes, outputs), before any validation;
- `metadata`: gRPC metadata keys;
- `arguments`: command-line argument types `remat` and `remat serve` share.

Wire modules (protobuf):

- `v1`: the generated stubs of proto/remat/v1 (`package remat.v1`);
- `wire`: domain values <-> protobuf messages (tensors, attributes, graphs, policies,
  metrics) and a graph's content id;
- `chunks`: the fast framing of RunStream's tensor chunks.
"""
