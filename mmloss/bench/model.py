"""``python -m mmloss.bench --model h100|h200|a100``: a performance model of mmloss's GPU paths —
PREDICTIONS, computed on any machine (no GPU needed), never measurements.

For each loss (CLIP: ``similarity_lse`` rows + columns, forward + backward; SigLIP:
``pairwise_sigmoid_sum`` with its gradients), path (the Triton backend's fused kernels
``MMLOSS_TRITON_PATH=fused``, its vendor-GEMM path ``MMLOSS_TRITON_PATH=gemm`` when
``mmloss/ops/triton/gemm_path.py`` exists, and the ``torch`` backend) and size, the path itself is
run on ``meta`` tensors under ``mmloss.ops._traffic.counting(execute=False)`` with the modelled
GPU's tile-table row and SM count (``modelled_device``): Triton launches report their plan's
GEMMs and traffic (``mmloss/ops/triton/_counts.py``), torch operations are counted as the kernels
they become (``opcount.TorchOpCounter``), and allocations are tracked for the workspace.

From the counts: GEMM-equivalents (FLOPs / 2·N·M·D), bytes per logit at HBM and L2 and outside the
GEMMs, workspace above inputs, outputs and gradients, launches, and a roofline time — per
kernel ``max(FLOPs / peak(operand dtype), HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth)``,
summed, plus a launch gap per kernel — next to the floor of 4 GEMMs (3 for the summed sigmoid) at
the input dtype's peak. ``--measured`` puts a GPU run's times beside the predictions.
The method and its limits: benchmarks/README.md, "Performance model".
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from mmloss.ops import _traffic
from mmloss.ops._spec import PairSpec

from .devices import DEVICES, Device
from .opcount import TorchOpCounter

PATHS = ("fused", "gemm", "torch")
LOSSES = {
    "clip": ("CLIP (similarity_lse rows + columns, forward + backward)", 4, 32768),
    "siglip": ("SigLIP (pairwise_sigmoid_sum with gradients)", 3, 65536),
}
GEMM_PATH_MODULE = "mmloss.ops.triton.gemm_path"
MIB = 1 << 20
PREDICTION_NOTE = ("PREDICTIONS of a performance model (counts from the code path run on meta tensors; "
                   "published peaks; L2 bandwidth and launch gap estimated), not measurements")


@dataclass(frozen=True)
class Scenario:
    loss: str
    n: int
    m: int
    d: int
    dtype: torch.dtype
    deterministic: bool = True

    @property
    def reference_flops(self) -> float:
        """One GEMM-equivalent: 2·N·M·D."""
        return 2.0 * self.n * self.m * self.d


@dataclass
class Counted:
    """What one run of a path did (``count``)."""

    recorder: Optional[_traffic.Recorder]
    peak_above_bytes: int = 0   # peak above inputs and results (what a GPU run reports)
    workspace_bytes: int = 0    # most bytes held at once by buffers that are not results
    error: str = ""


# ----------------------------------------------------------------------------- running a path


def gemm_path_reason() -> Optional[str]:
    """None when the Triton GEMM path can be counted here, else why not."""
    try:
        found = importlib.util.find_spec(GEMM_PATH_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "mmloss/ops/triton/gemm_path.py (MMLOSS_TRITON_PATH=gemm) is not present in this checkout"
    return None


@contextlib.contextmanager
def modelled_device(device: Device):
    """The Triton backend's device-dependent choices as ``device`` would make them: its
    tile-table row (``_config.arch_key``), ``sms × programs_per_sm`` persistent programs
    (``_launch.target_programs``) and the GPU column-split alignment (``_launch.split_align``).
    Every ``mmloss.ops.triton`` module that imported these functions by name sees the
    replacements inside the block."""
    from mmloss.ops.triton import _config, _launch

    if gemm_path_reason() is None:
        importlib.import_module(GEMM_PATH_MODULE)  # patched too, whenever the backend imports it
    replacements = {
        id(_config.arch_key): lambda dev: device.arch,
        id(_launch.target_programs): lambda dev, per_sm: device.sms * per_sm,
        id(_launch.split_align): lambda dev: _launch.SPLIT_ALIGN,
    }
    saved = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "mmloss.ops.triton" or name.startswith("mmloss.ops.triton.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in replacements:
                saved.append((module, attr, value))
                setattr(module, attr, replacements[id(value)])
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


@contextlib.contextmanager
def _triton_path(path: str):
    key = "MMLOSS_TRITON_PATH"
    old = os.environ.get(key)
    os.environ[key] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _spec(s: Scenario, device: torch.device) -> PairSpec:
    x = torch.empty((s.n, s.d), dtype=s.dtype, device=device)
    y = torch.empty((s.m, s.d), dtype=s.dtype, device=device)
    scale = torch.empty((), dtype=torch.float32, device=device)
    if device.type != "meta":
        torch.manual_seed(0)
        x, y = torch.randn_like(x), torch.randn_like(y)
        scale.fill_(10.0)
    if s.loss == "clip":
        return PairSpec(x=x, y=y, scale=scale, scale_value=0.0, bias=None, bias_value=0.0, marks="diagonal",
                        offset=0, x_labels=None, y_labels=None, deterministic=s.deterministic)
    bias = torch.empty((), dtype=torch.float32, device=device)
    if device.type != "meta":
        bias.fill_(-10.0)
    return PairSpec(x=x, y=y, scale=scale, scale_value=0.0, bias=bias, bias_value=0.0, marks="diagonal",
                    offset=0, x_labels=None, y_labels=None, deterministic=s.deterministic)


def _backend(path: str):
    if path == "torch":
        from mmloss.ops import torch_chunked

        return torch_chunked
    import mmloss.ops.triton as triton_backend

    return triton_backend


def _run(module, s: Scenario, spec: PairSpec, upstream):
    """One loss step through the backend functions; returns everything it produced (kept alive
    until the workspace is read)."""
    if s.loss == "clip":
        out = module.similarity_lse_forward(spec, True, True)
        # (row, col, row_stats, col_stats[, kept logits]): everything after the LSEs is saved
        grads = module.similarity_lse_backward(spec, upstream[0], upstream[1], *out[2:], (True, True, True, False))
        return out, grads
    return module.pairwise_sigmoid_sum(spec, (True, True, True, True))


def count(s: Scenario, path: str, device: Device, *, tensors: str = "meta") -> Counted:
    """Run ``path`` on ``s`` and count it. ``tensors``: "meta" (any size, kernels skipped) or
    "cpu" (real tensors, executed: the torch backend only — a cross-check of the meta run)."""
    if path == "gemm":
        reason = gemm_path_reason()
        if reason:
            return Counted(None, error=reason)
    dev = torch.device(tensors)
    spec = _spec(s, dev)
    upstream = (torch.ones(s.n, dtype=torch.float32, device=dev), torch.ones(s.m, dtype=torch.float32, device=dev))
    env = _triton_path(path) if path != "torch" else contextlib.nullcontext()
    counter = TorchOpCounter(l2_resident_bytes=device.l2_bytes // 4)
    try:
        with env, modelled_device(device), _traffic.counting(execute=dev.type != "meta") as rec, counter:
            produced = _run(_backend(path), s, spec, upstream)
            peak_above, workspace = counter.peak_bytes - counter.live_bytes, counter.transient_peak()
            del produced
    except Exception as exc:  # a path that cannot run this scenario is reported, not fatal
        return Counted(None, error=f"{type(exc).__name__}: {exc}"[:300])
    fused_ran = any(_kernel(t.what).startswith(("lse_stats#", "owner#")) for t in rec.transfers)
    if path == "gemm" and fused_ran:
        return Counted(rec, peak_above, workspace,
                       error="MMLOSS_TRITON_PATH=gemm still ran the fused kernels (the setting was not honoured)")
    if path == "fused" and not fused_ran:
        return Counted(rec, peak_above, workspace, error="MMLOSS_TRITON_PATH=fused ran no fused kernel")
    return Counted(rec, peak_above, workspace)


# ----------------------------------------------------------------------------- the model


def _kernel(what: str) -> str:
    return what.split(": ", 1)[0]


def _prefix(what: str) -> str:
    return what.split(": ", 1)[0] if ": " in what else ""


def _detail(what: str) -> str:
    return what.split(": ", 1)[1] if ": " in what else what


def gemm_side(what: str) -> bool:
    """Whether a transfer is the GEMMs' own operand or accumulator traffic — not "outside the
    GEMMs". Two naming schemes: ``"<kernel>#<n>: gemm …"`` (the fused kernels' ``_counts`` and
    ``opcount``) and the categories ``"operands: …"`` / ``"accumulators: …"`` (``gemm_path``);
    the logit blocks a GEMM writes or reads (``logits``) count as outside."""
    return _detail(what).startswith("gemm") or _prefix(what) in ("operands", "accumulators")


def kernel_group(what: str, gemm: bool) -> str:
    """The kernel a record belongs to, for its roofline: the ``<kernel>#<n>`` id when the record
    has one; records without one (``gemm_path``'s) are pooled — its GEMMs with their operand,
    accumulator and logit traffic ("… (GEMM)"), and everything else as memory-bound epilogues."""
    prefix = _prefix(what)
    if "#" in prefix:
        return prefix
    if gemm or prefix in ("operands", "accumulators") or "GEMM)" in what:
        return "GEMMs (pooled)"
    return "epilogues (pooled)"


def fp32_matmul_exact() -> bool:
    """Whether torch's fp32 matmuls run exact (FMA units) rather than as TF32, as set in this
    process (the same reading as the Triton backend's)."""
    from mmloss.ops.triton._launch import dot_precision

    return dot_precision(torch.float32) == "ieee"


def predict(s: Scenario, path: str, device: Device, counted: Counted, exact_fp32: bool) -> dict:
    """One row of predictions (times in ms, bytes per logit, MiB)."""
    title, floor_gemms, _ = LOSSES[s.loss]
    floor_ms = floor_gemms * s.reference_flops / device.peak_flops(s.dtype, exact_fp32) * 1e3
    row = dict(loss=s.loss, path=path, mode="deterministic" if s.deterministic else "deterministic=False",
               n=s.n, m=s.m, d=s.d, dtype=str(s.dtype).replace("torch.", ""), device=device.name,
               floor_gemms=floor_gemms, floor_ms=floor_ms, prediction=True, error=counted.error)
    rec = counted.recorder
    if rec is None or counted.error:
        return row
    logits = float(s.n * s.m)
    kernels: dict = {}
    for g in rec.gemms:
        k = kernels.setdefault(kernel_group(g.what, True), [0.0, 0, 0])
        k[0] += g.flops / device.peak_flops(g.operand_dtype, exact_fp32)
    for t in rec.transfers:
        k = kernels.setdefault(kernel_group(t.what, False), [0.0, 0, 0])
        k[1 if t.level == "hbm" else 2] += t.read + t.write
    roofline = serial = 0.0
    for compute_s, hbm, l2 in kernels.values():
        parts = (compute_s, hbm / device.hbm_bw, l2 / device.l2_bw)
        roofline += max(parts)
        serial += sum(parts)
    gap = rec.launches * device.launch_gap_s
    outside = sum(t.read + t.write for t in rec.transfers if not gemm_side(t.what))
    tensor_core = sum(g.flops for g in rec.gemms if g.operand_dtype in (torch.float16, torch.bfloat16)
                      or (g.operand_dtype == torch.float32 and not exact_fp32))
    predicted_ms = (roofline + gap) * 1e3
    row.update(
        gemm_equivalents=rec.gemm_flops() / s.reference_flops,
        tensor_core_gemm_equivalents=tensor_core / s.reference_flops,
        gemm_calls=len(rec.gemms),
        hbm_bytes_per_logit=rec.bytes_at("hbm") / logits,
        l2_bytes_per_logit=rec.bytes_at("l2") / logits,
        non_gemm_bytes_per_logit=outside / logits,
        atomic_bytes_per_logit=sum(t.read + t.write for t in rec.transfers if t.atomic) / logits,
        workspace_mib=counted.workspace_bytes / MIB,
        peak_above_results_mib=counted.peak_above_bytes / MIB,
        reported_workspace_mib=rec.workspace_bytes() / MIB,
        launches=rec.launches,
        predicted_ms=predicted_ms,
        no_overlap_ms=(serial + gap) * 1e3,
        launch_gap_ms=gap * 1e3,
        over_floor=predicted_ms / floor_ms,
    )
    return row


def scenarios(losses, sizes: Optional[list], dims: list, dtypes: list) -> list:
    out = []
    for loss in losses:
        for n in sizes or [LOSSES[loss][2]]:
            for d in dims:
                for dtype in dtypes:
                    for det in (True, False):
                        out.append(Scenario(loss, n, n, d, dtype, det))
    return out


def model_rows(device: Device, cases: list, paths=PATHS) -> list:
    """Predictions for every scenario × path (the torch backend in its one mode)."""
    exact = fp32_matmul_exact()
    rows = []
    for s in cases:
        for path in paths:
            if path == "torch" and not s.deterministic:
                continue  # the torch backend has one mode
            rows.append(predict(s, path, device, count(s, path, device), exact))
    return rows


# ----------------------------------------------------------------------------- measured runs


def read_measured(path: str) -> dict:
    """Measured total times (ms) of a GPU run, keyed like the predictions: (loss, path, mode, n,
    d) and (loss, "floor", "", n, d). Reads ``kernel_bench.py``'s results.jsonl lines and
    ``python -m mmloss.bench --json`` files (its torch-backend and floor rows); a folder means
    every such file in it (what benchmarks/gpu/run.sh writes)."""
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".jsonl") or (f.startswith("bench") and f.endswith(".json")))
    found: dict = {}
    for name in files:
        with open(name) as f:
            text = f.read()
        if name.endswith(".jsonl"):
            for line in text.splitlines():
                if line.strip():
                    _kernel_bench_row(json.loads(line), found)
        else:
            for r in json.loads(text).get("results", []):
                _bench_row(r, found)
    return found


def _kernel_bench_row(r: dict, found: dict) -> None:
    loss, impl, ms = r.get("section"), r.get("impl", ""), r.get("total_ms")
    if loss not in LOSSES or ms is None or "N" not in r:
        return
    n, d = r["N"], r.get("D")
    if impl.startswith("floor"):
        found[(loss, "floor", "", n, d)] = ms
        return
    mode = "deterministic=False" if "deterministic=False" in impl else "deterministic"
    # runs before the path knob, and "auto" for half inputs, ran the fused kernels
    path = r.get("path") or "fused"
    found[(loss, "fused" if path == "auto" else path, mode, n, d)] = ms


def _bench_row(r: dict, found: dict) -> None:
    loss, ms = r.get("loss"), r.get("total_ms_median")
    if loss not in LOSSES or ms is None or r.get("status", "ok") != "ok":
        return
    if r.get("kind") == "floor":
        found.setdefault((loss, "floor", "", r["batch"], r["dim"]), ms)
    elif r.get("impl") == "mmloss[torch]":
        found[(loss, "torch", "deterministic", r["batch"], r["dim"])] = ms


def attach_measured(rows: list, measured: dict) -> None:
    for row in rows:
        ms = measured.get((row["loss"], row["path"], row["mode"], row["n"], row["d"]))
        floor = measured.get((row["loss"], "floor", "", row["n"], row["d"]))
        row["measured_ms"] = ms
        row["measured_floor_ms"] = floor
        row["measured_over_floor"] = ms / floor if ms is not None and floor else None
        row["measured_over_predicted"] = ms / row["predicted_ms"] if ms is not None and row.get("predicted_ms") else None


# ----------------------------------------------------------------------------- output


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def header_lines(device: Device, exact: bool) -> list:
    fp32 = (f"FMA units, {device.fp32_flops / 1e12:.1f} TFLOP/s (torch fp32 matmul precision 'highest')" if exact
            else f"TF32 tensor cores, {device.tf32_flops / 1e12:.0f} TFLOP/s")
    return [
        f"PREDICTED GPU speed — {device.name} ({device.arch}, {device.sms} SMs). {PREDICTION_NOTE}.",
        f"  peaks: {device.bf16_flops / 1e12:.0f} TFLOP/s dense bf16/fp16 (published); fp32 matmuls on {fp32}; "
        f"HBM {device.hbm_bw / 1e12:.2f} TB/s (published); L2 ≈ {device.l2_bw / 1e12:.1f} TB/s (ESTIMATE); "
        f"launch gap ≈ {device.launch_gap_s * 1e6:.0f} µs (ESTIMATE)",
        "  time per kernel = max(FLOPs/peak, HBM bytes/HBM bw, L2 bytes/L2 bw), summed, + launches × gap; "
        "'no overlap' sums the three instead",
    ]


COLUMNS = (("path", "<8", "path"), ("mode", "<19", "mode"), ("GEMM-eq", ">7", "gemm_equivalents", ".2f"),
           ("HBM B/logit", ">11", "hbm_bytes_per_logit", ".1f"), ("L2 B/logit", ">10", "l2_bytes_per_logit", ".1f"),
           ("non-GEMM B/logit", ">16", "non_gemm_bytes_per_logit", ".1f"),
           ("workspace MiB", ">13", "workspace_mib", ".0f"), ("peak−grads MiB", ">14", "peak_above_results_mib", ".0f"),
           ("launches", ">8", "launches", "d"),
           ("pred. ms", ">8", "predicted_ms", ".2f"), ("no-overlap ms", ">13", "no_overlap_ms", ".2f"),
           ("× floor", ">7", "over_floor", ".2f"))
MEASURED_COLUMNS = (("meas. ms", ">8", "measured_ms", ".2f"), ("meas. × floor", ">13", "measured_over_floor", ".2f"))


def table_lines(rows: list, with_measured: bool) -> list:
    cols = COLUMNS + (MEASURED_COLUMNS if with_measured else ())
    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["loss"], r["n"], r["m"], r["d"], r["dtype"]), []).append(r)
    for (loss, n, m, d, dtype), group in groups.items():
        first = group[0]
        floor = f"floor {first['floor_gemms']} GEMMs = {first['floor_ms']:.2f} ms"
        if with_measured and first.get("measured_floor_ms"):
            floor += f" (measured {first['measured_floor_ms']:.2f} ms)"
        lines.append("")
        lines.append(f"{LOSSES[loss][0]} — N = {n}, M = {m}, D = {d}, {dtype} — {floor}")
        lines.append("  ".join(format(c[0], c[1]) for c in cols))
        for r in group:
            if r.get("error"):
                lines.append(f"{r['path']:<8}  {r['mode']:<19}  not counted: {r['error']}")
                continue
            cells = []
            for c in cols:
                v = r.get(c[2])
                cells.append(format(v if len(c) == 3 else _f(v, c[3]), c[1]))
            lines.append("  ".join(cells))
    return lines


def main(parser, args) -> int:
    """The ``--model`` command: print the predictions (and write ``--json``)."""
    device = DEVICES[args.model]
    losses = ["clip", "siglip"] if args.loss is None else [t.strip() for t in args.loss.split(",") if t.strip()]
    for loss in losses:
        if loss not in LOSSES:
            parser.error(f"--model covers the losses {', '.join(LOSSES)}; got {loss!r}")
    paths = PATHS if not args.paths else [t.strip() for t in args.paths.split(",") if t.strip()]
    for path in paths:
        if path not in PATHS:
            parser.error(f"--paths: choose from {', '.join(PATHS)}; got {path!r}")
    cases = scenarios(losses, args.sizes, args.dim or [768], args.dtype or [torch.bfloat16])
    rows = model_rows(device, cases, paths)
    measured = None
    if args.measured:
        try:
            measured = read_measured(args.measured)
        except (OSError, ValueError) as exc:
            parser.error(f"--measured: cannot read {args.measured}: {type(exc).__name__}: {exc}")
        attach_measured(rows, measured)
    exact = fp32_matmul_exact()
    for line in header_lines(device, exact) + table_lines(rows, measured is not None):
        print(line)
    missing = sorted({r["error"] for r in rows if r.get("error")})
    if missing:
        print("\nnot counted:\n" + "\n".join(f"  {m}" for m in missing))
    if args.json:
        doc = {"meta": {"kind": "performance model", "note": PREDICTION_NOTE, "device": asdict(device),
                        "fp32_matmul_exact": exact, "command": "python -m mmloss.bench --model " + args.model},
               "predictions": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"\npredictions written to {args.json}")
    return 0


__all__ = ["Counted", "Scenario", "count", "main", "model_rows", "modelled_device", "predict", "read_measured",
           "scenarios"]
