"""Checkpoint policies, remat against torch.utils.checkpoint: peak memory and time.

    python bench/checkpoint.py [--quick] [--threads N] [--malloc default|tuned|both]

For an MLP and a stack of transformer blocks, every configuration (a remat policy, or
a torch checkpointing mode) runs in its own fresh process (bench/_rss_worker.py):
build the model, one warm-up forward+backward, reset the kernel's peak-RSS counter,
one measured forward+backward. The peak is that process's peak resident set over its
RSS once the model was built, the same way for both frameworks. Prints one Markdown
table per model; see bench/README.md for the method and the columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from _procmem import MiB, reset_works  # bench/ is on sys.path when run as a script

WORKER = Path(__file__).with_name("_rss_worker.py")
# glibc's defaults raise the mmap threshold up to 32 MiB as big blocks are freed, so
# later big blocks come from the heap, whose freed memory stays resident. Fixing the
# thresholds (which also turns off that adjustment) makes big blocks mmap'd again.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

SIZES = {
    "full": {
        "mlp": dict(kind="mlp", layers=64, batch=2048, width=128),
        "transformer": dict(
            kind="transformer", blocks=8, batch=8, seq=128, d_model=128, heads=4, d_ff=512
        ),
    },
    "quick": {
        "mlp": dict(kind="mlp", layers=16, batch=1024, width=128),
        "transformer": dict(
            kind="transformer", blocks=4, batch=2, seq=64, d_model=64, heads=4, d_ff=256
        ),
    },
}
# every_k counts segment boundaries (forward values every later one depends on only
# through them): the MLP has one per layer, a transformer block about two.
EVERY_K = {"mlp": (2, 4, 16), "transformer": (1, 2, 8)}
REVOLVE_SLOTS = (4, 8)


def describe(spec: dict) -> str:
    if spec["kind"] == "mlp":
        act = spec["batch"] * spec["width"] * 4 / MiB
        return (
            f"MLP: {spec['layers']} tanh layers of width {spec['width']} + linear head, "
            f"batch {spec['batch']}, float32 ({act:g} MiB per activation); "
            "remat.models.mlp"
        )
    return (
        f"transformer: {spec['blocks']} pre-LN blocks (remat.models.transformer_block's "
        f"block, stacked in bench/_rss_worker.py), batch {spec['batch']}, seq {spec['seq']}, "
        f"d_model {spec['d_model']}, {spec['heads']} heads, d_ff {spec['d_ff']}, float32"
    )


def configurations(name: str, spec: dict, recompute_all: bool) -> list[tuple[str, str, list]]:
    """(label, framework, mode), the framework's baseline first."""
    depth = spec["layers"] + 1 if name == "mlp" else spec["blocks"]  # torch's layer list
    remat = [("store_all", ["store_all"]), ("sqrt", ["sqrt"])]
    remat += [(f"every_k({k})", ["every_k", k]) for k in EVERY_K[name]]
    remat += [(f"revolve({c})", ["revolve", c]) for c in REVOLVE_SLOTS]
    if recompute_all:
        remat.append(("recompute_all", ["recompute_all"]))
    root = max(2, round(math.sqrt(depth)))
    segments = sorted({max(2, root // 2), root, min(depth, root * 2)})
    block = "layer" if name == "mlp" else "block"
    torch = [("torch: no checkpointing", ["plain"])]
    torch += [
        (f"torch: checkpoint_sequential({s}{', sqrt' if s == root else ''})", ["sequential", s])
        for s in segments
    ]
    torch.append((f"torch: checkpoint per {block} ({depth})", ["per_block"]))
    return [(label, "remat", mode) for label, mode in remat] + [
        (label, "torch", mode) for label, mode in torch
    ]


def run_worker(config: dict, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if tuned:
        env.update(TUNED_MALLOC)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(config)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"  worker failed ({config['framework']} {config['mode']}):\n{tail}", file=sys.stderr)
        return {"failed": True}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


# --- tables ------------------------------------------------------------------------------------
KEPT = 8 * MiB  # RSS still held from the previous request that counts as "kept"


def peak_mib(r: dict) -> float:
    """The measured step's peak RSS over the RSS of the built model (before warm-up)."""
    return (r["peak"] - r["rss_built"]) / MiB


def above_inputs(r: dict) -> int:
    """remat's accounted peak less the inputs, which the request holds throughout (the
    RSS baseline already has them)."""
    return r["peak_bytes"] - r["input_bytes"]


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}"


def table(rows: list[tuple[str, str, dict]], settings: list[str]) -> str:
    """rows: (label, framework, {setting: result})."""
    names = {"default": "", "tuned": ", mmap env"}
    head = ["config"]
    for s in settings:
        head += [f"RSS peak MiB{names[s]}", "× base", f"time ms{names[s]}", "× base"]
    head += ["accounted peak MiB", "accounted − inputs MiB", "× base"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    base: dict[tuple[str, str], dict] = {}
    for label, framework, results in rows:
        cells = [label]
        for s in settings:
            r = results.get(s, {"failed": True})
            b = base.setdefault((framework, s), r)
            ok, b_ok = not r.get("failed"), not b.get("failed")
            cells += [
                fmt(peak_mib(r) if ok else None, ".1f"),
                ratio(peak_mib(r) if ok else None, peak_mib(b) if b_ok else None),
                fmt(r["seconds"] * 1e3 if ok else None, ".0f"),
                ratio(r["seconds"] if ok else None, b["seconds"] if b_ok else None),
            ]
        r = next((results[s] for s in settings if "peak_bytes" in results.get(s, {})), None)
        b = next((b for s in settings if "peak_bytes" in (b := base[(framework, s)])), None)
        if framework == "remat" and r is not None:
            cells += [
                f"{r['peak_bytes'] / MiB:.1f}",
                f"{above_inputs(r) / MiB:.1f}",
                ratio(above_inputs(r), above_inputs(b) if b else None),
            ]
        else:
            cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[tuple[str, str, dict]], settings: list[str]) -> list[str]:
    out = []
    for s in settings:
        for fw in ("remat", "torch"):
            mine = [
                (label, res[s])
                for label, f, res in rows
                if f == fw and s in res and not res[s].get("failed")
            ]
            if len(mine) < 2:
                continue
            (base_label, base), rest = mine[0], mine[1:]
            setting = "glibc default" if s == "default" else "MALLOC_MMAP/TRIM_THRESHOLD_=131072"
            best_label, best = min(rest, key=lambda item: peak_mib(item[1]))
            text = (
                f"{fw}, {setting}: lowest RSS peak {best_label} "
                f"{peak_mib(best) / peak_mib(base):.2f}× of {base_label}"
            )
            if fw == "remat":
                lag = [
                    label
                    for label, r in rest
                    if peak_mib(r) / peak_mib(base) > above_inputs(r) / above_inputs(base) + 0.15
                ]
                text += f" (accounted {above_inputs(best) / above_inputs(base):.2f}×)" + (
                    f"; RSS falls less than the accounted peak (by > 0.15 of the "
                    f"baseline) for: {', '.join(lag)}"
                    if lag
                    else "; RSS follows the accounted peak in every row (within 0.15)"
                )
            else:
                flat = [label for label, r in rest if peak_mib(r) >= 0.9 * peak_mib(base)]
                if flat:
                    text += f"; RSS did not fall (>= 0.9× baseline) for: {', '.join(flat)}"
            retained = statistics.median((r["rss_before"] - r["rss_built"]) / MiB for _, r in mine)
            growth = statistics.median((r["peak"] - r["rss_before"]) / MiB for _, r in mine)
            text += (
                f". Median RSS kept after the warm-up step {retained:.1f} MiB; median growth "
                f"during the measured step (from its start) {growth:.1f} MiB."
            )
            out.append(text)
    remat_base = next((res for label, fw, res in rows if fw == "remat"), {})
    torch_base = next((res for label, fw, res in rows if fw == "torch"), {})
    for s in settings:
        a, b = remat_base.get(s, {}), torch_base.get(s, {})
        if "loss" in a and "loss" in b:
            same = math.isclose(a["loss"], b["loss"], rel_tol=1e-4)
            out.append(
                f"losses agree (remat {a['loss']:.6g}, torch {b['loss']:.6g}): "
                f"{'yes' if same else 'NO'}"
            )
            break
    mismatch = [
        label
        for label, _, res in rows
        for r in res.values()
        if "peak_bytes" in r and r["peak_bytes"] != r["predicted_peak_bytes"]
    ]
    out.append(
        "accounted peak == simulator's prediction in every remat row: "
        + ("yes" if not mismatch else f"NO ({', '.join(sorted(set(mismatch)))})")
    )
    return out


SERVER_POLICIES = (("store_all", ["store_all"]), ("sqrt", ["sqrt"]), ("revolve(4)", ["revolve", 4]))
SERVER_TRIALS = 3
SETTING_NAMES = {
    "default": "glibc default",
    "tuned": "mmap env",
    "trim": "malloc_trim(0) after each request",
}


def server_table(rows: list[tuple[str, dict]], settings: list[str]) -> str:
    """rows: (policy label, {setting: result}), store_all first."""
    head = ["policy (after a store_all request)"]
    for s in settings:
        head += [f"{SETTING_NAMES[s]}: RSS peak MiB", "× store_all", "kept", "ms"]
    head += ["accounted − inputs MiB", "× store_all"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    base = rows[0][1]
    for label, results in rows:
        cells = [label]
        for s in settings:
            r, b = results.get(s, {"failed": 1}), base.get(s, {"failed": 1})
            if r.get("failed") or b.get("failed"):
                cells += ["—"] * 4
                continue
            kept = sum(t["rss_before"] - r["rss_built"] >= KEPT for t in r["trials"])
            cells += [
                f"{peak_mib(r):.1f}",
                ratio(peak_mib(r), peak_mib(b)),
                f"{kept}/{len(r['trials'])}",
                f"{r['seconds'] * 1e3:.0f}",
            ]
        r = next((results[s] for s in settings if "peak_bytes" in results.get(s, {})), None)
        b = next((base[s] for s in settings if "peak_bytes" in base.get(s, {})), None)
        if r and b:
            cells += [f"{above_inputs(r) / MiB:.1f}", ratio(above_inputs(r), above_inputs(b))]
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads for both torch and NumPy's BLAS (default 1)"
    )
    parser.add_argument(
        "--malloc",
        choices=("default", "tuned", "both"),
        default=None,
        help="glibc malloc settings to run under: default, tuned "
        "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_=131072) or both "
        "(the default; --quick: default only)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per configuration, the first also measured for "
        "memory; the median is reported (default 3, --quick 1; fewer "
        "once they add up to 2 s)",
    )
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated subset")
    parser.add_argument(
        "--no-recompute-all",
        action="store_true",
        help="skip recompute_all (quadratic in depth: the slowest row)",
    )
    parser.add_argument(
        "--no-server",
        action="store_true",
        help="skip the server-like runs (a thread pool, after a store_all request)",
    )
    parser.add_argument("--json", type=Path, help="also write every raw measurement here")
    args = parser.parse_args()
    malloc = args.malloc or ("default" if args.quick else "both")
    settings = ["default", "tuned"] if malloc == "both" else [malloc]
    sizes = SIZES["quick" if args.quick else "full"]

    print(
        f"# checkpoint policies: remat vs torch.utils.checkpoint (CPU, {args.threads} "
        "thread(s), peak RSS per fresh process)\n"
    )
    print(
        f"torch {metadata.version('torch')}, numpy {metadata.version('numpy')}, python "
        f"{platform.python_version()}, {os.confstr('CS_GNU_LIBC_VERSION')}, "
        f"{os.cpu_count()} CPUs; OMP/OPENBLAS/MKL_NUM_THREADS and torch.set_num_threads "
        f"= {args.threads}\n"
    )
    hwm_reset = reset_works()
    print(
        "peak RSS: VmHWM of the measured step, reset just before it by writing 5 to "
        "/proc/self/clear_refs (checked: works here)\n"
        if hwm_reset
        else "WARNING: writing 5 to /proc/self/clear_refs does not reset VmHWM here; peaks are "
        "each process's lifetime VmHWM (= ru_maxrss), warm-up step included\n"
    )
    repeats = args.repeats or (1 if args.quick else 3)
    started, raw = time.perf_counter(), {}
    for name in args.models.split(","):
        spec = sizes[name]
        rows = []
        for label, framework, mode in configurations(name, spec, not args.no_recompute_all):
            config = dict(
                model=spec,
                framework=framework,
                mode=mode,
                threads=args.threads,
                hwm_reset=hwm_reset,
                repeats=repeats,
                time_budget=2.0,
            )
            results = {s: run_worker(config, s == "tuned") for s in settings}
            print(
                f"  {name} {label}: "
                + ", ".join(
                    f"{s} {peak_mib(r):.1f} MiB {r['seconds'] * 1e3:.0f} ms"
                    for s, r in results.items()
                    if not r.get("failed")
                ),
                file=sys.stderr,
            )
            rows.append((label, framework, results))
        raw[name] = {"spec": spec, "rows": rows}
        inputs = next(
            (r["input_bytes"] for _, _, res in rows for r in res.values() if "input_bytes" in r), 0
        )
        print(
            f"## {describe(spec)}\n\nInputs and parameters {inputs / MiB:.1f} MiB. "
            "Baselines (× base = 1): remat store_all, torch no checkpointing.\n"
        )
        print(table(rows, settings) + "\n")
        print("\n".join(f"- {line}" for line in notes(rows, settings)) + "\n")
        if args.no_server:
            continue
        # As the gRPC server runs them: on a 4-thread pool, after an earlier store_all
        # request, so whatever the allocator kept from that request is still there.
        server, server_settings = [], settings + ["trim"]
        for label, mode in SERVER_POLICIES:
            config = dict(
                model=spec,
                framework="remat",
                mode=mode,
                threads=args.threads,
                hwm_reset=hwm_reset,
                repeats=1,
                time_budget=0.0,
                pool=4,
                warmup=["store_all"],
                trials=SERVER_TRIALS,
            )
            results = {
                s: run_worker(dict(config, trim=s == "trim"), s == "tuned") for s in server_settings
            }
            print(
                f"  {name} server-like {label}: "
                + ", ".join(
                    f"{s} {peak_mib(r):.1f} MiB" for s, r in results.items() if not r.get("failed")
                ),
                file=sys.stderr,
            )
            server.append((label, results))
        raw[name]["server"] = server
        print(
            f"### {name}, server-like: Engine.run on a 4-thread pool, each measured request "
            f"right after a store_all request ({SERVER_TRIALS} times per process)\n"
        )
        print(server_table(server, server_settings) + "\n")
        print(
            f"RSS peak: the worst of the {SERVER_TRIALS} measured requests; kept: in how many "
            f"of them at least {KEPT // MiB} MiB of RSS was still held from the store_all "
            "request when the measured one started.\n"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
