"""The command's options: parsing and validation (``build_parser``), and the choice of what to run
(``select``: losses, sizes, dimensions, dtypes, mmloss backends and peers usable on the device,
with the reasons for those that are not). Errors go through ``parser.error`` (exit status 2)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

import torch

from mmloss.ops import BACKENDS, resolve_backend

from . import peers
from .cases import CASES, DEFAULT_LOSSES

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Default sweeps. NT-Xent's similarity matrix is 2B×2B, so its batches are half the others' (the
# same matrix sizes). The CPU sweep also gets a time limit (160 s, plus ≈ 10 s of checks and start-up),
# so it ends in under 3 minutes even on a slower or busy machine (the largest sizes are dropped
# first, and listed).
CPU_DEFAULTS = {"sizes": [1024, 2048, 4096], "ntxent_sizes": [512, 1024, 2048], "dim": 512,
                "dtype": torch.float32, "time_limit": 160.0}
CUDA_DEFAULTS = {"sizes": [4096, 8192, 16384, 32768, 65536], "ntxent_sizes": [2048, 4096, 8192, 16384, 32768],
                 "dim": 768, "dtype": torch.bfloat16, "time_limit": None}


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _convert(text: str, convert, message: str):
    """``convert(text)``; its ValueError becomes the argparse error ``message``."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None


def _size(text: str) -> int:
    t = text.strip().lower()
    factor = 1
    if t.endswith("k"):
        t, factor = t[:-1], 1024
    value = _convert(t, int, f"not a batch size: {text!r}") * factor
    if value < 2:
        raise argparse.ArgumentTypeError(f"batch sizes must be ≥ 2, got {value}")
    return value


def _sizes(text: str) -> list:
    values = [_size(t) for t in _csv(text)]
    if not values:
        raise argparse.ArgumentTypeError("give at least one size, e.g. --sizes 1024,4096")
    return sorted(set(values))


def _dims(text: str) -> list:
    values = _convert(text, lambda dims: [int(t) for t in _csv(dims)], f"--dim takes integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--dim must be ≥ 1, got {text!r}")
    return sorted(set(values))


def _dtypes(text: str) -> list:
    out = []
    for t in _csv(text):
        if t.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {t!r}; choose from float32, bfloat16, float16")
        if DTYPES[t.lower()] not in out:
            out.append(DTYPES[t.lower()])
    if not out:
        raise argparse.ArgumentTypeError("give a dtype, e.g. --dtype float32")
    return out


def _positive_int(text: str) -> int:
    value = _convert(text, int, f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _nproc(text: str) -> int:
    value = _convert(text, int, f"--nproc takes an integer, got {text!r}")
    if value < 2:
        raise argparse.ArgumentTypeError(f"--nproc needs at least 2 processes, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _convert(text, float, f"expected a number of seconds, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _busy(text: str) -> int:
    value = _convert(text, int, f"--busy takes an integer, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"--busy must be ≥ 0, got {value}")
    return value


def _logit_budgets(text: str) -> list:
    """``0,80MiB`` → [0, 83886080]: one mmloss row per budget (``mmloss.logit_budget``)."""
    from mmloss.ops._budget import parse_budget

    values = []
    for t in _csv(text):
        try:
            value = parse_budget(t, "--logit-budget")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value not in values:
            values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one byte count, e.g. --logit-budget 0,80MiB")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmloss.bench",
        description="Time and peak memory of mmloss's fused losses against dense torch and installed "
                    "peers (open_clip, lightly, pytorch-metric-learning, Inf-CL, memeff, siglip-kernel). "
                    "Without options: a sweep sized for the device present.",
        epilog="Example (the headline CPU comparison): python -m mmloss.bench --loss clip --sizes 8192 "
               "--dim 512 --dtype float32 --backends torch --peers open_clip,dense",
    )
    p.add_argument("--loss", default=None, help=f"comma list of {', '.join(CASES)} or 'all' "
                   f"(default: {','.join(DEFAULT_LOSSES)})")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="batch sizes B, comma list, 'k' = ×1024 (default on CPU: 1024,2048,4096, NT-Xent "
                        "512,1024,2048; on CUDA: 4096…65536, NT-Xent 2048…32768)")
    p.add_argument("--dim", type=_dims, default=None, help="embedding dimension D, or a comma list "
                   "(default: 512 on CPU, 768 on CUDA)")
    p.add_argument("--dtype", type=_dtypes, default=None, help="float32 | bfloat16 | float16, or a comma "
                   "list (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backends", default="all", help=f"mmloss backends: comma list of {', '.join(BACKENDS)}, "
                   "'all' (every available one except reference) or 'none'")
    p.add_argument("--peers", default="all", help=f"comma list of {', '.join(peers.PEERS)}, 'all' "
                   "(every installed one) or 'none'")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed repetitions per implementation (default: 10/7/5 on CPU by size, 20/10 "
                        "on CUDA; docs/design.md asks for ≥ 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop starting new configurations after this many seconds (or when the next "
                        "one is predicted to overrun its share); the skipped ones are listed (default: "
                        "160 s for the default CPU sweep, none otherwise)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (rewritten after every configuration)")
    p.add_argument("--csv", metavar="PATH", help="write results as CSV (appended after every configuration)")
    p.add_argument("--plot", metavar="PNG", help="write time and memory against batch size (log–log)")
    p.add_argument("--no-checks", action="store_true", help="skip the re-timing and dense-memory checks")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--list", action="store_true", help="list the losses, backends and peers available here and exit")
    p.add_argument("--nproc", type=_nproc, default=None, metavar="N",
                   help="multi-process mode: N ≥ 2 ranks (gloo on the CPU, NCCL with one GPU per rank) "
                        "measure mmloss's distributed='gather' and 'ring' against open_clip's distributed "
                        "losses; --sizes are then PER-RANK batch sizes (defaults: CPU 2048, D 128, fp32; "
                        "CUDA 4096,16384, D 768, bf16)")
    p.add_argument("--smoke", action="store_true",
                   help="with --nproc: tiny shapes (B_local 16, D 8, 2 rounds unless given), for CI")
    p.add_argument("--busy", type=_busy, default=0, metavar="N",
                   help="start N competing busy processes (one single-threaded spin loop each) for the "
                        "duration of the measurement, e.g. DataLoader workers holding cores (default 0)")
    p.add_argument("--logit-budget", type=_logit_budgets, default=None, metavar="BYTES",
                   help="comma list of logit budgets (e.g. 0,80MiB): each mmloss backend is measured once "
                        "per budget under mmloss.logit_budget(...) — a budget that admits the N×M logits "
                        "keeps them for the backward (default: MMLOSS_LOGIT_BUDGET, one row)")
    p.add_argument("--from-json", metavar="PATH", help="measure nothing: print the tables of a saved --json "
                   "file (and write --plot / --csv from it)")
    p.add_argument("--model", choices=("h100", "h200", "a100"), default=None,
                   help="measure nothing: PREDICT the GPU speed of mmloss's paths on this GPU from a performance "
                        "model (counts from the code path run on meta tensors; published peaks); --loss clip,siglip, "
                        "--sizes (default CLIP 32768, SigLIP 65536), --dim (768), --dtype (bfloat16), --json "
                        "apply (benchmarks/README.md, 'Performance model')")
    p.add_argument("--paths", default=None, help="with --model: comma list of fused, gemm, torch (default: all)")
    p.add_argument("--measured", metavar="PATH", help="with --model: a GPU run's results (results.jsonl, a --json "
                   "file, or benchmarks/gpu/run.sh's output folder) to print beside the predictions")
    return p


def choose_device(parser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device: not a device: {text!r} (use cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: only cpu and cuda are supported, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available to this torch build "
                         f"(torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def backend_reason(name: str, device: torch.device) -> Optional[str]:
    try:
        resolve_backend(name, device)
    except RuntimeError as exc:
        return str(exc)
    return None


def choose_backends(parser, text: str, device: torch.device):
    """(usable backend names, {name: reason} of those not usable here)."""
    reasons = {b: backend_reason(b, device) for b in BACKENDS}
    key = text.strip().lower()
    if key == "none":
        return [], {}
    if key == "all":
        chosen = [b for b in BACKENDS if b != "reference" and reasons[b] is None]
        return chosen, {b: r for b, r in reasons.items() if r is not None and b != "reference"}
    chosen = []
    for name in _csv(text):
        if name not in BACKENDS:
            parser.error(f"--backends: unknown backend {name!r}; choose from {', '.join(BACKENDS)}, all, none")
        if reasons[name] is not None:
            parser.error(f"--backends: {reasons[name]}")
        if name not in chosen:
            chosen.append(name)
    return chosen, {}


def choose_peers(parser, text: str, device: torch.device):
    """(usable peer names, {name: reason} of requested/known peers not usable here)."""
    key = text.strip().lower()
    if key == "none":
        return [], {}
    wanted = list(peers.PEERS) if key == "all" else _csv(text)
    for name in wanted:
        if name not in peers.PEERS:
            parser.error(f"--peers: unknown peer {name!r}; choose from {', '.join(peers.PEERS)}, all, none")
    usable, missing = [], {}
    for name in dict.fromkeys(wanted):
        reason = peers.peer_status(name, device)
        if reason is None:
            usable.append(name)
        else:
            missing[name] = reason
    return usable, missing


def choose_losses(parser, text: Optional[str]):
    names = list(DEFAULT_LOSSES) if text is None else (list(CASES) if text.strip().lower() == "all" else _csv(text))
    if not names:
        parser.error("--loss: give at least one loss")
    for name in names:
        if name not in CASES:
            parser.error(f"--loss: unknown loss {name!r}; choose from {', '.join(CASES)}, all")
    return [CASES[n] for n in dict.fromkeys(names)]


@dataclass
class Selection:
    """What one run measures, as chosen from the options and the device (the plan step)."""

    runnable: list  # LossCases in this mmloss build
    sizes: dict  # loss name -> batch sizes
    dims: list
    dtypes: list
    time_limit: Optional[float]
    default_limit: bool  # the time limit is the default sweep's
    backends: list
    backend_missing: dict  # backend -> why it cannot run here
    peer_names: list
    peer_missing: dict  # peer -> why it cannot run here
    notes: list = field(default_factory=list)
    logit_budgets: list = field(default_factory=lambda: [None])  # None: the environment's budget


def _default_sizes(args, defaults: dict) -> dict:
    if args.sizes:
        return {c.name: args.sizes for c in CASES.values()}
    return {c.name: defaults["ntxent_sizes"] if c.name == "ntxent" else defaults["sizes"] for c in CASES.values()}


def select(parser, args, device: torch.device) -> Selection:
    """The losses, sizes, backends and peers to run. A requested loss missing from this mmloss
    build is a note (``runnable`` may come back empty); only peers implementing a runnable loss
    are kept."""
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    cases = choose_losses(parser, args.loss)
    sizes = _default_sizes(args, defaults)
    time_limit = args.time_limit
    default_limit = time_limit is None and args.sizes is None and defaults["time_limit"] is not None
    if default_limit:
        time_limit = defaults["time_limit"]
    dims = args.dim or [defaults["dim"]]
    dtypes = args.dtype or [defaults["dtype"]]
    backends, backend_missing = choose_backends(parser, args.backends, device)
    peer_names, peer_missing = choose_peers(parser, args.peers, device)
    notes = [f"{case.name}: not available in this mmloss build (mmloss.{case.mmloss_name} is "
             "missing) — not benchmarked" for case in cases if case.mmloss_function() is None]
    runnable = [case for case in cases if case.mmloss_function() is not None]
    if runnable and not backends and not peer_names:
        parser.error("--backends none --peers none leaves nothing to measure")
    relevant = {p for p in peers.PEERS if any(c.name in peers.PEERS[p].losses for c in runnable)}
    return Selection(runnable, sizes, dims, dtypes, time_limit, default_limit, backends, backend_missing,
                     [p for p in peer_names if p in relevant],
                     {p: r for p, r in peer_missing.items() if p in relevant}, notes,
                     args.logit_budget or [None])
