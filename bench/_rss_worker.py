"""One configuration of bench/checkpoint.py, measured in a fresh process.

    python bench/_rss_worker.py '{"model": {...}, "framework": "remat", "mode": [...], ...}'

Runs one forward+backward of a tiny replica of the model (so lazily imported modules
and one-time initialisation land in the baseline), builds the real model, reads the
RSS (the baseline), runs one warm-up forward+backward, resets the kernel's peak-RSS
counter (writing "5" to /proc/self/clear_refs resets VmHWM), runs one measured
forward+backward and reads VmHWM back: the process's peak resident set during that
step, whoever allocated it (NumPy, torch, BLAS, the Python heap). More timed repeats
follow for the time. Prints one JSON line. bench/checkpoint.py starts one of these
per configuration, so no configuration inherits another's heap.

Server-like remat runs: "pool" runs Engine.run on a ThreadPoolExecutor as the gRPC
server does, "warmup" names the policy of the request served just before (instead of
the measured one), "trials" repeats (that request, measured request), reporting the
worst, and "trim" calls malloc_trim(0) after every request.
"""

from __future__ import annotations

import json
import os
import sys

# BLAS reads its thread count when the library loads: set it before numpy or torch.
if __name__ == "__main__":
    CONFIG = json.loads(sys.argv[1])
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(CONFIG["threads"])

import gc  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from _procmem import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402  (bench/ is sys.path[0])

import remat  # noqa: E402
from remat import models  # noqa: E402


# --- models: the same function in remat and in torch ---------------------------------------
def mlp(spec: dict) -> models.Model:
    """remat.models.mlp: `layers` tanh layers of `width`, a 10-way linear head,
    cross-entropy and an L2 penalty on the weights."""
    widths = (spec["width"],) * (spec["layers"] + 1) + (10,)
    return models.mlp(batch=spec["batch"], widths=widths, dtype="float32")


def transformer_stack(spec: dict) -> models.Model:
    """`blocks` pre-LN transformer blocks, each exactly remat.models.transformer_block's
    (unmasked attention, tanh gelu), parameters suffixed by the block index;
    loss = mean(y ** 2) of the last block's output. remat.models has one block only,
    so the stack is built here with the public SDK."""
    batch, seq, d_model, heads, d_ff = (
        spec[k] for k in ("batch", "seq", "d_model", "heads", "d_ff")
    )
    d_head = d_model // heads
    rng = np.random.default_rng(0)
    g = remat.Graph("transformer_stack")
    inputs = {"x": rng.standard_normal((batch, seq, d_model)).astype("float32")}
    y = g.input("x", (batch, seq, d_model), "float32")

    def param(name: str, value: np.ndarray):
        inputs[name] = value.astype("float32")
        return g.input(name, value.shape, "float32")

    def dense(name: str, fan_in: int, fan_out: int):
        return param(name, rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in))

    def split_heads(t):  # (B, S, D) -> (B, H, S, d_head)
        return remat.transpose(remat.reshape(t, (batch, seq, heads, d_head)), (0, 2, 1, 3))

    for i in range(spec["blocks"]):
        x = y
        ln1_w, ln1_b = param(f"ln1_w{i}", np.ones(d_model)), param(f"ln1_b{i}", np.zeros(d_model))
        wq, wk, wv, wo = (dense(f"{n}{i}", d_model, d_model) for n in ("wq", "wk", "wv", "wo"))
        ln2_w, ln2_b = param(f"ln2_w{i}", np.ones(d_model)), param(f"ln2_b{i}", np.zeros(d_model))
        w1, b1 = dense(f"w1_{i}", d_model, d_ff), param(f"b1_{i}", np.zeros(d_ff))
        w2, b2 = dense(f"w2_{i}", d_ff, d_model), param(f"b2_{i}", np.zeros(d_model))
        h = remat.layer_norm(x, ln1_w, ln1_b)
        q, k, v = (split_heads(h @ w) for w in (wq, wk, wv))
        scores = remat.matmul(q, remat.transpose(k, (0, 1, 3, 2))) * (1.0 / np.sqrt(d_head))
        attn = remat.softmax(scores, axis=-1)
        context = remat.reshape(remat.transpose(attn @ v, (0, 2, 1, 3)), (batch, seq, d_model))
        h = remat.add(x, context @ wo, name=f"resid1_{i}")
        m = remat.gelu(remat.add(remat.layer_norm(h, ln2_w, ln2_b) @ w1, b1))
        y = remat.add(h, remat.add(m @ w2, b2), name=f"block{i}")
    g.output("loss", remat.mean(remat.square(y), name="loss"))
    return models.Model(g, inputs, [name for name in inputs if name != "x"])


BUILDERS = {"mlp": mlp, "transformer": transformer_stack}


def torch_layers(spec: dict, t: dict) -> tuple[list[Callable], Callable]:
    """The model as a list of one-tensor-in, one-tensor-out layers (what
    checkpoint_sequential takes) and the loss of the last layer's output."""
    import torch
    import torch.nn.functional as F

    if spec["kind"] == "mlp":
        layers = [
            (lambda h, i=i: torch.tanh(h @ t[f"w{i}"] + t[f"b{i}"])) for i in range(spec["layers"])
        ]
        last = spec["layers"]
        layers.append(lambda h: h @ t[f"w{last}"] + t[f"b{last}"])  # the linear head
        penalty = lambda: sum(torch.sum(t[f"w{i}"] * t[f"w{i}"]) for i in range(last + 1))
        return layers, lambda logits: F.cross_entropy(logits, t["labels"]) + penalty() * 1e-4

    heads = spec["heads"]

    def block(x, i):
        batch, seq, d_model = x.shape
        d_head = d_model // heads

        def split(u):
            return u.reshape(batch, seq, heads, d_head).permute(0, 2, 1, 3)

        h = F.layer_norm(x, (d_model,), t[f"ln1_w{i}"], t[f"ln1_b{i}"], eps=1e-5)
        q, k, v = (split(h @ t[f"{w}{i}"]) for w in ("wq", "wk", "wv"))
        attn = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d_head)), dim=-1)
        h = x + (attn @ v).permute(0, 2, 1, 3).reshape(batch, seq, d_model) @ t[f"wo{i}"]
        m = F.gelu(
            F.layer_norm(h, (d_model,), t[f"ln2_w{i}"], t[f"ln2_b{i}"], eps=1e-5) @ t[f"w1_{i}"]
            + t[f"b1_{i}"],
            approximate="tanh",
        )
        return h + (m @ t[f"w2_{i}"] + t[f"b2_{i}"])

    layers = [(lambda x, i=i: block(x, i)) for i in range(spec["blocks"])]
    return layers, lambda y: torch.mean(y * y)


# --- one forward+backward per framework -----------------------------------------------------
def remat_policy(spec: list):
    from remat_proto import policies

    name, *args = spec
    return {
        "store_all": policies.StoreAll,
        "recompute_all": policies.RecomputeAll,
        "sqrt": policies.Sqrt,
        "every_k": policies.EveryK,
        "revolve": policies.Revolve,
    }[name](*args)


def malloc_trim() -> None:
    """Give the C heap's free memory back to the OS (glibc: every arena)."""
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)


def remat_step(
    model: models.Model, policy_spec: list, pool: int = 0, trim: bool = False
) -> tuple[Callable[..., float], dict]:
    """Engine.run in this process: no protobuf, no gRPC, no tensor copies. With `pool`,
    on a ThreadPoolExecutor of that many threads, as the gRPC server runs requests;
    with `trim`, malloc_trim(0) after each run. step(policy_spec) runs another policy."""
    from concurrent.futures import ThreadPoolExecutor

    from remat_server.engine import Engine, RunRequest
    from remat_server.graph.limits import Limits
    from remat_server.service.codec import graph_from_proto

    spec = graph_from_proto(model.graph.to_proto(), Limits())
    engine, info = Engine(), {}
    threads = ThreadPoolExecutor(pool, thread_name_prefix="remat") if pool else None

    def step(other: list | None = None) -> float:
        request = RunRequest(
            spec,
            model.inputs,
            wrt=tuple(model.wrt),
            loss=model.loss,
            policy=remat_policy(other or policy_spec),
        )

        def run():
            try:
                return engine.run(request)
            finally:
                if trim:
                    malloc_trim()  # the request's own result is still held here

        result = threads.submit(run).result() if threads else run()
        info.update(
            peak_bytes=result.metrics.peak_bytes,
            predicted_peak_bytes=result.metrics.predicted_peak_bytes,
            recomputed_nodes=result.metrics.recomputed_nodes,
            exec_seconds=result.metrics.forward_seconds
            + result.metrics.backward_seconds
            + result.metrics.recompute_seconds,
        )
        return float(result.outputs[model.loss])

    return step, info


def torch_step(
    model: models.Model, spec: dict, mode: list, threads: int
) -> tuple[Callable[[], float], dict]:
    import torch
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    torch.set_num_threads(threads)
    t = {
        name: torch.from_numpy(value).requires_grad_(name in model.wrt)
        for name, value in model.inputs.items()
    }
    params = [t[name] for name in model.wrt]
    layers, loss_of = torch_layers(spec, t)
    name, *args = mode

    def forward(x):
        if name == "sequential":
            return checkpoint_sequential(layers, args[0], x, use_reentrant=False)
        for layer in layers:
            x = checkpoint(layer, x, use_reentrant=False) if name == "per_block" else layer(x)
        return x

    def step() -> float:
        loss = loss_of(forward(t["x"]))
        torch.autograd.grad(loss, params)  # the gradients are returned, then dropped
        return loss.item()

    return step, {"torch_threads": torch.get_num_threads()}


def tiny(spec: dict) -> dict:
    """The same architecture (depth, heads) at a negligible size."""
    if spec["kind"] == "mlp":
        return dict(spec, batch=4, width=4)
    return dict(spec, batch=1, seq=2, d_model=spec["heads"], d_ff=4)


def make_step(config: dict, spec: dict) -> tuple[Callable[[], float], dict, models.Model]:
    model = BUILDERS[spec["kind"]](spec)
    if config["framework"] == "remat":
        return (
            *remat_step(model, config["mode"], config.get("pool", 0), config.get("trim", False)),
            model,
        )
    return (*torch_step(model, spec, config["mode"], config["threads"]), model)


def main() -> int:
    config = CONFIG
    # Prime the code path on a tiny replica first: modules imported lazily on the first
    # call (torch.utils.checkpoint pulls in ~90 MiB of them) then count in the baseline,
    # not as the step's memory.
    make_step(config, tiny(config["model"]))[0]()
    step, info, model = make_step(config, config["model"])
    gc.collect()
    rss_built = rss_bytes()
    trials, seconds = [], []
    for _ in range(config.get("trials", 1)):
        if config.get("warmup"):  # a server that served another policy just before
            step(config["warmup"])
        else:
            step()  # warm-up: first touch of everything this configuration uses
        gc.collect()
        rss_before = rss_bytes()
        if config["hwm_reset"]:  # else VmHWM stays the lifetime peak, warm-up included
            reset_hwm()
        start = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - start)
        trials.append(dict(rss_before=rss_before, peak=hwm_bytes(), rss_after=rss_bytes()))
    # More repeats for a steadier time, unless one step is already slow.
    while len(seconds) < config["repeats"] and sum(seconds) < config["time_budget"]:
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    worst = max(trials, key=lambda trial: trial["peak"])
    print(
        json.dumps(
            dict(
                **info,
                **worst,
                loss=loss,
                seconds=statistics.median(seconds),
                samples=len(seconds),
                rss_built=rss_built,
                trials=trials,
                input_bytes=sum(a.nbytes for a in model.inputs.values()),
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
