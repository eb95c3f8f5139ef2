from remat_proto.v1 import graph_pb2 as _graph_pb2
from remat_proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GraphRef(_message.Message):
    __slots__ = ("graph", "graph_id", "onnx")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    graph_id: str
    onnx: OnnxModel
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., onnx: _Optional[_Union[OnnxModel, _Mapping]] = ...) -> None: ...

class OnnxModel(_message.Message):
    __slots__ = ("model", "dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    dtype: str
    def __init__(self, model: _Optional[bytes] = ..., dtype: _Optional[str] = ...) -> None: ...

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph", "onnx")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    onnx: OnnxModel
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., onnx: _Optional[_Union[OnnxModel, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    def __init__(self, graph_id: _Optional[str] = ...) -> None: ...

class StoreAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecomputeAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EveryK(_message.Message):
    __slots__ = ("k",)
    K_FIELD_NUMBER: _ClassVar[int]
    k: int
    def __init__(self, k: _Optional[int] = ...) -> None: ...

class Sqrt(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Checkpoints(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class SaveOps(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ops: _Optional[_Iterable[str]] = ...) -> None: ...

class Revolve(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: int
    def __init__(self, slots: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("bytes", "fraction", "profile")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    fraction: float
    profile: bool
    def __init__(self, bytes: _Optional[int] = ..., fraction: _Optional[float] = ..., profile: _Optional[bool] = ...) -> None: ...

class Optimal(_message.Message):
    __slots__ = ("bytes", "fraction", "time_limit_seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    fraction: float
    time_limit_seconds: float
    def __init__(self, bytes: _Optional[int] = ..., fraction: _Optional[float] = ..., time_limit_seconds: _Optional[float] = ...) -> None: ...

class DTR(_message.Message):
    __slots__ = ("bytes", "fraction")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    fraction: float
    def __init__(self, bytes: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class MinMemory(_message.Message):
    __slots__ = ("time_limit_seconds",)
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    time_limit_seconds: float
    def __init__(self, time_limit_seconds: _Optional[float] = ...) -> None: ...

class Auto(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("name", "store_all", "recompute_all", "every_k", "sqrt", "checkpoints", "save_ops", "revolve", "budget", "optimal", "dtr", "auto", "min_memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORE_ALL_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_ALL_FIELD_NUMBER: _ClassVar[int]
    EVERY_K_FIELD_NUMBER: _ClassVar[int]
    SQRT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    SAVE_OPS_FIELD_NUMBER: _ClassVar[int]
    REVOLVE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    OPTIMAL_FIELD_NUMBER: _ClassVar[int]
    DTR_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    store_all: StoreAll
    recompute_all: RecomputeAll
    every_k: EveryK
    sqrt: Sqrt
    checkpoints: Checkpoints
    save_ops: SaveOps
    revolve: Revolve
    budget: Budget
    optimal: Optimal
    dtr: DTR
    auto: Auto
    min_memory: MinMemory
    def __init__(self, name: _Optional[str] = ..., store_all: _Optional[_Union[StoreAll, _Mapping]] = ..., recompute_all: _Optional[_Union[RecomputeAll, _Mapping]] = ..., every_k: _Optional[_Union[EveryK, _Mapping]] = ..., sqrt: _Optional[_Union[Sqrt, _Mapping]] = ..., checkpoints: _Optional[_Union[Checkpoints, _Mapping]] = ..., save_ops: _Optional[_Union[SaveOps, _Mapping]] = ..., revolve: _Optional[_Union[Revolve, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., optimal: _Optional[_Union[Optimal, _Mapping]] = ..., dtr: _Optional[_Union[DTR, _Mapping]] = ..., auto: _Optional[_Union[Auto, _Mapping]] = ..., min_memory: _Optional[_Union[MinMemory, _Mapping]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("graph", "inputs", "fetch", "wrt", "loss", "cotangents", "policy", "timeline", "measure_memory", "trace")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class CotangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    MEASURE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    graph: GraphRef
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    fetch: _containers.RepeatedScalarFieldContainer[str]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    loss: str
    cotangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    policy: Policy
    timeline: bool
    measure_memory: bool
    trace: bool
    def __init__(self, graph: _Optional[_Union[GraphRef, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., fetch: _Optional[_Iterable[str]] = ..., wrt: _Optional[_Iterable[str]] = ..., loss: _Optional[str] = ..., cotangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., timeline: _Optional[bool] = ..., measure_memory: _Optional[bool] = ..., trace: _Optional[bool] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("peak_bytes", "predicted_peak_bytes", "forward_seconds", "backward_seconds", "recompute_seconds", "plan_seconds", "total_seconds", "nodes_computed", "recomputed_nodes", "flops", "recompute_flops", "measured_peak_bytes", "policy", "queue_seconds", "planner", "plan_cached")
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NODES_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_NODES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    PLAN_CACHED_FIELD_NUMBER: _ClassVar[int]
    peak_bytes: int
    predicted_peak_bytes: int
    forward_seconds: float
    backward_seconds: float
    recompute_seconds: float
    plan_seconds: float
    total_seconds: float
    nodes_computed: int
    recomputed_nodes: int
    flops: int
    recompute_flops: int
    measured_peak_bytes: int
    policy: str
    queue_seconds: float
    planner: PlannerReport
    plan_cached: bool
    def __init__(self, peak_bytes: _Optional[int] = ..., predicted_peak_bytes: _Optional[int] = ..., forward_seconds: _Optional[float] = ..., backward_seconds: _Optional[float] = ..., recompute_seconds: _Optional[float] = ..., plan_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., nodes_computed: _Optional[int] = ..., recomputed_nodes: _Optional[int] = ..., flops: _Optional[int] = ..., recompute_flops: _Optional[int] = ..., measured_peak_bytes: _Optional[int] = ..., policy: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., planner: _Optional[_Union[PlannerReport, _Mapping]] = ..., plan_cached: _Optional[bool] = ...) -> None: ...

class PlannerReport(_message.Message):
    __slots__ = ("budget_bytes", "status", "optimality_gap", "solve_seconds", "detail", "chosen")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OPTIMALITY_GAP_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    status: str
    optimality_gap: float
    solve_seconds: float
    detail: str
    chosen: str
    def __init__(self, budget_bytes: _Optional[int] = ..., status: _Optional[str] = ..., optimality_gap: _Optional[float] = ..., solve_seconds: _Optional[float] = ..., detail: _Optional[str] = ..., chosen: _Optional[str] = ...) -> None: ...

class TraceEvent(_message.Message):
    __slots__ = ("node", "op", "phase", "start_seconds", "seconds", "live_bytes")
    NODE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    node: str
    op: str
    phase: str
    start_seconds: float
    seconds: float
    live_bytes: int
    def __init__(self, node: _Optional[str] = ..., op: _Optional[str] = ..., phase: _Optional[str] = ..., start_seconds: _Optional[float] = ..., seconds: _Optional[float] = ..., live_bytes: _Optional[int] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("outputs", "grads", "metrics", "warnings", "timeline", "trace")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    grads: _containers.MessageMap[str, _tensor_pb2.Tensor]
    metrics: Metrics
    warnings: _containers.RepeatedScalarFieldContainer[str]
    timeline: _containers.RepeatedScalarFieldContainer[int]
    trace: _containers.RepeatedCompositeFieldContainer[TraceEvent]
    def __init__(self, outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., grads: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ..., timeline: _Optional[_Iterable[int]] = ..., trace: _Optional[_Iterable[_Union[TraceEvent, _Mapping]]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("run", "policies", "repeats", "warmup")
    RUN_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    run: RunRequest
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    repeats: int
    warmup: bool
    def __init__(self, run: _Optional[_Union[RunRequest, _Mapping]] = ..., policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ..., repeats: _Optional[int] = ..., warmup: _Optional[bool] = ...) -> None: ...

class CompareResult(_message.Message):
    __slots__ = ("index", "total", "policy", "metrics", "max_grad_diff", "timeline", "trace", "error", "error_code")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_DIFF_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    index: int
    total: int
    policy: str
    metrics: Metrics
    max_grad_diff: float
    timeline: _containers.RepeatedScalarFieldContainer[int]
    trace: _containers.RepeatedCompositeFieldContainer[TraceEvent]
    error: str
    error_code: str
    def __init__(self, index: _Optional[int] = ..., total: _Optional[int] = ..., policy: _Optional[str] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., max_grad_diff: _Optional[float] = ..., timeline: _Optional[_Iterable[int]] = ..., trace: _Optional[_Iterable[_Union[TraceEvent, _Mapping]]] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ...) -> None: ...

class DifferentiateRequest(_message.Message):
    __slots__ = ("graph", "wrt", "loss", "input_shapes")
    class InputShapesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.IntList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.IntList, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPES_FIELD_NUMBER: _ClassVar[int]
    graph: GraphRef
    wrt: _containers.RepeatedScalarFieldContainer[str]
    loss: str
    input_shapes: _containers.MessageMap[str, _graph_pb2.IntList]
    def __init__(self, graph: _Optional[_Union[GraphRef, _Mapping]] = ..., wrt: _Optional[_Iterable[str]] = ..., loss: _Optional[str] = ..., input_shapes: _Optional[_Mapping[str, _graph_pb2.IntList]] = ...) -> None: ...

class DifferentiateResponse(_message.Message):
    __slots__ = ("graph", "grad_outputs")
    class GradOutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    grad_outputs: _containers.ScalarMap[str, str]
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., grad_outputs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("graph", "wrt", "loss", "cotangent_outputs", "policy", "input_shapes", "fetch", "include_schedule")
    class InputShapesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.IntList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.IntList, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COTANGENT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPES_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    graph: GraphRef
    wrt: _containers.RepeatedScalarFieldContainer[str]
    loss: str
    cotangent_outputs: _containers.RepeatedScalarFieldContainer[str]
    policy: Policy
    input_shapes: _containers.MessageMap[str, _graph_pb2.IntList]
    fetch: _containers.RepeatedScalarFieldContainer[str]
    include_schedule: bool
    def __init__(self, graph: _Optional[_Union[GraphRef, _Mapping]] = ..., wrt: _Optional[_Iterable[str]] = ..., loss: _Optional[str] = ..., cotangent_outputs: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., input_shapes: _Optional[_Mapping[str, _graph_pb2.IntList]] = ..., fetch: _Optional[_Iterable[str]] = ..., include_schedule: _Optional[bool] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("compute", "free")
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    compute: str
    free: str
    def __init__(self, compute: _Optional[str] = ..., free: _Optional[str] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("peak_bytes", "flops", "recompute_flops", "node_evaluations", "timeline", "steps", "policy", "recomputed_nodes", "plan_seconds", "input_bytes", "planner", "plan_cached")
    class NodeEvaluationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    NODE_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_NODES_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    PLAN_CACHED_FIELD_NUMBER: _ClassVar[int]
    peak_bytes: int
    flops: int
    recompute_flops: int
    node_evaluations: _containers.ScalarMap[str, int]
    timeline: _containers.RepeatedScalarFieldContainer[int]
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    policy: str
    recomputed_nodes: int
    plan_seconds: float
    input_bytes: int
    planner: PlannerReport
    plan_cached: bool
    def __init__(self, peak_bytes: _Optional[int] = ..., flops: _Optional[int] = ..., recompute_flops: _Optional[int] = ..., node_evaluations: _Optional[_Mapping[str, int]] = ..., timeline: _Optional[_Iterable[int]] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., policy: _Optional[str] = ..., recomputed_nodes: _Optional[int] = ..., plan_seconds: _Optional[float] = ..., input_bytes: _Optional[int] = ..., planner: _Optional[_Union[PlannerReport, _Mapping]] = ..., plan_cached: _Optional[bool] = ...) -> None: ...

class ListOpsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttrInfo(_message.Message):
    __slots__ = ("name", "type", "required", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., doc: _Optional[str] = ...) -> None: ...

class OpInfo(_message.Message):
    __slots__ = ("name", "family", "min_inputs", "max_inputs", "attrs", "differentiable", "residuals", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    min_inputs: int
    max_inputs: int
    attrs: _containers.RepeatedCompositeFieldContainer[AttrInfo]
    differentiable: _containers.RepeatedScalarFieldContainer[bool]
    residuals: str
    doc: str
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., min_inputs: _Optional[int] = ..., max_inputs: _Optional[int] = ..., attrs: _Optional[_Iterable[_Union[AttrInfo, _Mapping]]] = ..., differentiable: _Optional[_Iterable[bool]] = ..., residuals: _Optional[str] = ..., doc: _Optional[str] = ...) -> None: ...

class ListOpsResponse(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[OpInfo]
    def __init__(self, ops: _Optional[_Iterable[_Union[OpInfo, _Mapping]]] = ...) -> None: ...

class RunStreamRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RunRequest
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[RunRequest, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class RunStreamResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RunResponse
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[RunResponse, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...
