"""One configuration of bench/models.py, measured in a fresh process.

    python bench/_zoo_worker.py '{"model": "resnet", "batch": 1536, "framework": "torch",
                                  "mode": "eager", "threads": 1, "hwm_reset": true}'

framework "torch": mode "eager" or "checkpoint" (torch.utils.checkpoint around every
block, bench/_zoo_case.py's BLOCKS); framework "remat": mode is a policy string
(`remat.policies.parse`: "store_all", "budget:0.5", "budget:123456B"), run through an
in-process server (`remat.Client.in_process()`, `client.run(..., out=previous)`: the
path bench/models.py times); framework "engine": the same without gRPC, `Engine.run`
on a one-thread pool under the server's glibc thresholds (bench/_rss_worker.py's
`remat_step`; mode "store_all"), which shows what the transfer adds.

The same method as bench/_rss_worker.py: first one step of the same model at batch 2
(so modules imported lazily on a first call, torch.export's included, and one-time
initialisation land in the baseline), then the model at its batch is built (module,
inputs, the loss's R; for remat the imported graph and its feeds), garbage is collected
and the RSS read: the **baseline** (`rss_built`). One warm-up step, a reset of the
kernel's peak-RSS counter (VmHWM, by writing "5" to /proc/self/clear_refs), one
measured step, VmHWM read back: `peak - rss_built` is the step's peak memory, whoever
allocated it. Prints one JSON line; a budget no schedule fits prints
{"does_not_fit": message}.

With "serve": true it measures nothing itself: it builds torch's two steps (eager and
checkpointed) and runs one per line read from stdin ("torch eager" or "torch
checkpoint"), answering each with a JSON line {"loss": ...}. bench/models.py times
torch through it, interleaved with remat's steps, because an in-process remat server
fixes glibc's malloc thresholds for the whole process (4 MiB: every big tensor mapped
and faulted in afresh), which made torch eager 1.5-3.5x slower in the same process.
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
import time  # noqa: E402

import torch  # noqa: E402
from _procmem import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402  (bench/ is sys.path[0])
from _rss_worker import remat_step as engine_step  # noqa: E402
from _zoo_case import Case, RematCase, remat_step, torch_step  # noqa: E402

import remat  # noqa: E402
from remat import models  # noqa: E402

PRIME_BATCH = 2


def make_step(config: dict, batch: int, client: remat.Client | None):
    """(step, info): step() runs one training step and returns the loss; info is filled
    with what the step reports (remat: the metrics of the last run)."""
    case = Case.build(config["model"], batch)
    if config["framework"] == "torch":
        info = {"input_bytes": case.input_bytes()}
        return torch_step(case, checkpoint_blocks=config["mode"] == "checkpoint"), info
    rc = RematCase.build(case)
    info = {"input_bytes": rc.input_bytes()}
    if config["framework"] == "engine":
        model = models.Model(rc.graph, rc.feeds, rc.wrt)
        step, engine_info = engine_step(model, [config["mode"]], pool=1)
        engine_info.update(info)  # the step updates engine_info in place
        return step, engine_info
    run = remat_step(client, rc, remat.policies.parse(config["mode"]))

    def step() -> float:
        result = run()
        metrics = result.metrics
        info.update(
            peak_bytes=metrics.peak_bytes,
            predicted_peak_bytes=metrics.predicted_peak_bytes,
            recomputed_nodes=metrics.recomputed_nodes,
            server_seconds=metrics.total_seconds,
        )
        return float(result.outputs["loss"])

    return step, info


def measure(config: dict, client: remat.Client | None) -> dict:
    prime, _ = make_step(dict(config, mode="store_all") if client else config, PRIME_BATCH, client)
    prime()
    if client:  # the measured policy's planner too, if it fits at this size
        try:
            make_step(config, PRIME_BATCH, client)[0]()
        except remat.ResourceExhaustedError:
            pass
    del prime
    step, info = make_step(config, config["batch"], client)
    gc.collect()
    rss_built = rss_bytes()
    step()  # warm-up: first touch of everything this configuration uses (remat: compiles)
    gc.collect()
    rss_before = rss_bytes()
    if config["hwm_reset"]:  # else VmHWM stays the lifetime peak, warm-up included
        reset_hwm()
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    return dict(
        **info,
        loss=loss,
        seconds=seconds,
        rss_built=rss_built,
        rss_before=rss_before,
        peak=hwm_bytes(),
        rss_after=rss_bytes(),
    )


def serve(config: dict) -> None:
    """Run torch steps on request, one per stdin line, for a timer in another process."""
    case = Case.build(config["model"], config["batch"])
    steps = {"torch eager": torch_step(case), "torch checkpoint": torch_step(case, True)}
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps({"loss": steps[line.strip()]()}), flush=True)


def main() -> int:
    torch.set_num_threads(CONFIG["threads"])
    if CONFIG.get("serve"):
        serve(CONFIG)
        return 0
    if CONFIG["framework"] == "engine":
        from remat_server.runtime import allocator

        allocator.tune_for_serving()  # the server's thresholds, without the server
    if CONFIG["framework"] in ("torch", "engine"):
        result = measure(CONFIG, None)
    else:
        with remat.Client.in_process() as client:
            try:
                result = measure(CONFIG, client)
            except remat.ResourceExhaustedError as error:
                result = {"does_not_fit": str(error)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
