"""How far a published run moves when only the CPU's kernels change: the spread the re-run checks allow.

    python scripts/kernel_spread.py exec avx2 -- CMD [ARG ...]  # run a command under a kernel set (make test-kernels)
    python scripts/kernel_spread.py run avx2 --out DIR        # re-run table1 LoRA seed 0 under that kernel set
    python scripts/kernel_spread.py report DIR [DIR ...]      # gaps of those re-runs -> tests/data/kernel-spread.json

A kernel set is the instruction set torch (ATen), oneDNN, MKL and numpy may use. One machine can select
every set up to its own (an AVX-512 CPU can run as an AVX2-only or an SSE4.1-level one), so one machine
measures how far a fresh run lands from the published one when nothing but float rounding differs:
training (hundreds of steps) and the sampling chain amplify those last bits. ``tests/test_results.py``
derives its tolerances from the gaps recorded here (and checks they cover every recorded gap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from selora import rerun, results
from selora.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SPREAD_FILE = REPO / "tests" / "data" / "kernel-spread.json"
#: The re-run measured: LoRA seed 0 of Table 1 (no expansion decision that could flip on rounding).
EXPERIMENT, METHOD, SEED = "table1", "lora", 0
#: Environment of each kernel set; ``native`` is whatever the CPU offers.
KERNEL_SETS = {
    "native": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    },
    "sse41": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    },
}
MARKER = "kernel-set.json"


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run(kernel_set: str, out: Path) -> Path:
    """Re-run :data:`METHOD` seed :data:`SEED` of :data:`EXPERIMENT` under ``kernel_set`` into ``out``."""
    cmd, env = rerun.rerun_command(results.load(EXPERIMENT), METHOD, SEED, out / "experiment")
    env = {**env, **KERNEL_SETS[kernel_set], "SELORA_CACHE": str(out / "cache")}  # a fresh data cache
    subprocess.run(cmd, env=env, check=True)
    marker = {"kernel_set": kernel_set, "env": KERNEL_SETS[kernel_set], "cpu": cpu_name()}
    atomic_write_text(out / MARKER, json.dumps(marker, indent=1))
    return out


def report(folders: Sequence[Path], dest: Path = SPREAD_FILE) -> dict:
    """Gaps (:func:`selora.rerun.gaps`) of each re-run folder to the published run, and their maximum."""
    published = results.load(EXPERIMENT)
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, folder in enumerate(folders):
            marker = json.loads((folder / MARKER).read_text())
            fresh = results.load(results.publish(folder / "experiment", f"rerun-{i}", Path(tmp)))
            measured.append({**marker, "gaps": rerun.gaps(published, fresh, METHOD, SEED)})
    keys = measured[0]["gaps"].keys()
    doc = {
        "what": f"{EXPERIMENT} {METHOD} seed {SEED} re-run under each kernel set vs. the published run",
        "published_on": published.provenance["versions"] | {"commit": published.provenance["git"]["commit"]},
        "torch": torch.__version__,
        "runs": measured,
        "max": {k: max(m["gaps"][k] for m in measured) for k in keys},
    }
    atomic_write_text(dest, json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    exec_p = sub.add_parser("exec", help="run a command under a kernel set")
    exec_p.add_argument("kernel_set", choices=KERNEL_SETS)
    exec_p.add_argument("command", nargs=argparse.REMAINDER)
    run_p = sub.add_parser("run", help="re-run the published run under a kernel set")
    run_p.add_argument("kernel_set", choices=KERNEL_SETS)
    run_p.add_argument("--out", type=Path, required=True)
    rep_p = sub.add_parser("report", help="write the gaps of finished re-runs")
    rep_p.add_argument("folders", type=Path, nargs="+")
    rep_p.add_argument("--dest", type=Path, default=SPREAD_FILE)
    args = parser.parse_args(argv)
    if args.cmd == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("exec: no command given after the kernel set")
        return subprocess.run(command, env={**os.environ, **KERNEL_SETS[args.kernel_set]}).returncode
    elif args.cmd == "run":
        run(args.kernel_set, args.out)
    else:
        missing = [str(f) for f in args.folders if not (f / MARKER).exists()]
        if missing:
            print(f"error: {', '.join(missing)}: no {MARKER} (not a finished `run` folder)", file=sys.stderr)
            return 2
        print(json.dumps(report(args.folders, args.dest)["max"], indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SELORA_PROFILE", "offline")
    sys.exit(main())
