"""The GPU check's Python side (bench/gpu_check.sh runs it; see that file and docs/benchmarks.md).

    python3 bench/gpu_check.py missing                     # required modules that do not import
    python3 bench/gpu_check.py env --mode gpu --work W     # versions, device, mamba-ssm; W/env.json
    python3 bench/gpu_check.py report --mode gpu --work W --out OUT

`report` reads what the steps left in the work folder (status.tsv from the shell script, pytest's
JUnit XML, the benchmarks' JSON lines, the quality run's folder and `ssmgen eval --json` output),
writes OUT/results.md and OUT/results.json, and prints the tables, the step table last. It never
turns a missing figure into a number: a step without its output reads FAIL with the reason.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# import name -> distribution, for what ssmgen, its tests and this check import
REQUIRED = {"numpy": "numpy", "torch": "torch", "soundfile": "soundfile", "soxr": "soxr",
            "cffi": "cffi", "pycparser": "pycparser", "typer": "typer", "rich": "rich",
            "yaml": "pyyaml", "numba": "numba", "pytest": "pytest", "xdist": "pytest-xdist"}
RATE = 16000
HELD_OUT_CLASSICAL = 5.408  # best classical coder on the held-out piece, raw codes (bits/sample)
# (what, threshold, higher is better) from issue 18
TARGETS = {"gen_b1": 2.0, "gen_b32": 100.0, "train_sps": 20e6, "held_out_bpb": 4.2}
STEPS = ["env", "cuda tests", "speed: generate", "speed: train", "quality: prep",
         "quality: train", "quality: eval"]


def missing() -> list[str]:
    out = []
    for module in REQUIRED:
        try:
            importlib.import_module(module)
        except Exception:  # absent, or present but broken (e.g. cffi without pycparser)
            out.append(module)
    return out


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        return f"missing ({type(e).__name__})"
    return str(getattr(mod, "__version__", "present"))


def env(mode: str, work: Path) -> int:
    """Print the environment; write work/env.json. Non-zero when something the run needs is
    absent: a required module, or (GPU mode) a CUDA device."""
    info: dict[str, Any] = {"mode": mode, "python": platform.python_version(),
                            "executable": sys.executable}
    info["modules"] = {m: _version(m) for m in REQUIRED}
    info["missing"] = missing()
    wheels = work / "wheels.txt"
    info["wheels"] = wheels.read_text().strip() if wheels.exists() else "not needed"
    problems = [f"missing module {m}" for m in info["missing"]]
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        info["cuda_version"] = torch.version.cuda
        if info["cuda"]:
            p = torch.cuda.get_device_properties(0)
            info["device"] = (f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} "
                              f"GiB, {p.multi_processor_count} SMs)")
        else:
            info["device"] = "cpu (no CUDA device)"
    except Exception as e:
        info["torch"], info["cuda"], info["device"] = f"broken ({e})", False, "unknown"
    if mode == "gpu" and not info["cuda"]:
        problems.append("no CUDA device visible to torch")
    try:
        import ssmgen
        from ssmgen.backends import mamba
        info["ssmgen"] = f"{ssmgen.__version__} from {Path(ssmgen.__file__).parent}"
        if mamba.HAS_KERNELS:
            import mamba_ssm
            info["mamba_ssm"] = f"mamba-ssm: {mamba_ssm.__version__}, its CUDA kernels used"
        else:
            info["mamba_ssm"] = "mamba-ssm: not installed, pure path used"
    except Exception as e:
        info["ssmgen"] = f"does not import ({type(e).__name__}: {e})"
        info["mamba_ssm"] = "mamba-ssm: unknown (ssmgen does not import)"
        problems.append("ssmgen does not import")
    info["problems"] = problems
    (work / "env.json").write_text(json.dumps(info, indent=2))
    for key in ("python", "executable", "torch", "cuda_version", "device", "ssmgen", "wheels"):
        print(f"{key}: {info.get(key)}")
    print("modules: " + ", ".join(f"{m} {v}" for m, v in info["modules"].items()))
    print(info["mamba_ssm"])
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _statuses(work: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    path = work / "status.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, seconds, rc = (line.split("\t") + ["", "", ""])[:4]
            out[name] = {"status": status, "seconds": int(seconds or 0), "rc": rc}
    return out


def _junit(path: Path) -> dict | None:
    """pytest's counts and the failing tests' ids from its JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing, skip_reasons = [], set()
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        if "failure" in kinds:
            counts["failed"] += 1
            failing.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failing.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skip_reasons.add(case.find("skipped").get("message", ""))
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing, "skip_reasons": sorted(skip_reasons)}


def _fmt_sps(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _quality(work: Path) -> dict:
    q: dict[str, Any] = {}
    metrics = work / "run" / "metrics.csv"
    if metrics.exists():
        with metrics.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            last = rows[-1]
            vals = [float(r["val_bpb"]) for r in rows if r.get("val_bpb")]
            q.update(steps=int(last["step"]), minutes=float(last["seconds"]) / 60,
                     samples_per_s=float(last["samples_per_s"]),
                     best_val_bpb=min(vals) if vals else None)
    try:  # the recipe the run used, from its own checkpoint
        from ssmgen.checkpoint import load_checkpoint
        t = load_checkpoint(work / "run" / "checkpoints" / "last.pt")["config"]["train"]
        q.update(batch=t["batch_size"], length=t["sample_len"], lr=t["lr"], amp=t["amp"])
    except Exception:  # no run: the train step's status already says why
        pass
    held = _read_json(work / "eval_heldout.json")
    if held:
        q["held_out_bpb"] = held["bpb"]
    test = _read_json(work / "eval_test.json")
    if test:
        q["test_bpb"] = test["bpb"]
    return q


def report(mode: str, work: Path, out: Path) -> int:
    st = _statuses(work)
    envinfo = _read_json(work / "env.json") or {}
    gen = _read_jsonl(work / "gen.jsonl")
    trn = _read_jsonl(work / "train.jsonl")
    tests = _junit(work / "junit.xml")
    q = _quality(work)
    steps: list[dict] = []

    def add(name: str, figures: str, extra_fail: str | None = None) -> None:
        s = st.get(name, {"status": "FAIL (did not run)", "seconds": 0})
        status = s["status"]
        if status == "ok" and extra_fail:
            status = f"FAIL ({extra_fail})"
        steps.append({"step": name, "status": status, "seconds": s["seconds"],
                      "figures": figures})

    add("env", "; ".join(x for x in [
        f"python {envinfo.get('python', '?')}", f"torch {envinfo.get('torch', '?')}",
        envinfo.get("device", "?"), f"wheels: {envinfo.get('wheels', '?')}",
        envinfo.get("mamba_ssm", "mamba-ssm: unknown")] + envinfo.get("problems", []) if x))

    if tests is None:
        add("cuda tests", "no JUnit report")
    else:
        fig = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
               f"{tests['skipped']} skipped")
        if tests["failing"]:
            fig += "; failing: " + ", ".join(tests["failing"][:6])
        if tests["skip_reasons"]:
            fig += "; skip reasons: " + " / ".join(tests["skip_reasons"][:3])
        # on the GPU all-skipped is a failure (no device seen); in the dry run it is the point
        add("cuda tests", fig, "nothing passed on the GPU" if mode == "gpu" and
            not tests["passed"] else None)

    ok_gen = [r for r in gen if "error" not in r and r["kind"] == "generate"]
    bad_gen = [r for r in gen if "error" in r]
    fig = f"{len(ok_gen)} measurements"
    if bad_gen:
        fig += "; failed: " + ", ".join(f"{r['preset']}/{r['backend']}/{r.get('engine', 'prompt')}"
                                        f"/b{r.get('batch', '')}: {r['error'][:80]}"
                                        for r in bad_gen[:4])
    prompts = [r for r in gen if r["kind"] == "prompt" and "read_s" in r]
    if prompts:
        fig += "; prompt read " + ", ".join(f"{r['preset']}/{r['backend']} {r['read_s']:.3f} s"
                                            for r in prompts if r["backend"] == "s4d")
    add("speed: generate", fig, None if gen else "no measurements")

    ok_trn = [r for r in trn if "error" not in r]
    fig = ", ".join(f"{r['preset']}/{r['backend']} {_fmt_sps(r['samples_per_s'])}/s"
                    for r in ok_trn)
    recipes = sorted({f"{r['batch']} x {r['length']}, {r['amp']}" for r in ok_trn})
    if recipes:
        fig += f" ({'; '.join(recipes)})"
    bad = [r for r in trn if "error" in r]
    if bad:
        fig += "; failed: " + ", ".join(f"{r['preset']}/{r['backend']}: {r['error'][:80]}"
                                        for r in bad[:4])
    add("speed: train", fig, None if trn else "no measurements")

    manifest = _read_json(work / "data" / "manifest.json")
    if manifest:
        sp = manifest.get("splits", {})
        add("quality: prep", ", ".join(f"{k} {v['files']} files {v['samples'] / RATE / 60:.1f} min"
                                       for k, v in sp.items()))
    else:
        add("quality: prep", "no dataset", "no manifest.json")
    if "steps" in q:
        fig = (f"{q['steps']} steps in {q['minutes']:.1f} min, "
               f"{_fmt_sps(q['samples_per_s'])} samples/s")
        if "batch" in q:  # train.amp 'auto' is bf16 on CUDA, off on the CPU
            amp = "bf16" if mode == "gpu" and q["amp"] in ("auto", "bf16") else "fp32"
            fig += f", {q['batch']} x {q['length']}, lr {q['lr']}, {amp}"
        if q.get("best_val_bpb") is not None:
            fig += f", best val {q['best_val_bpb']:.3f} bpb"
        add("quality: train", fig)
    else:
        add("quality: train", "no metrics", "no metrics.csv")
    if "held_out_bpb" in q:
        fig = (f"held-out piece {q['held_out_bpb']:.3f} bits/sample (target <= "
               f"{TARGETS['held_out_bpb']} after 5 min; best classical {HELD_OUT_CLASSICAL})")
        if "test_bpb" in q:
            fig += f"; test split {q['test_bpb']:.3f}"
        add("quality: eval", fig)
    else:
        add("quality: eval", "no result", "no eval output")

    targets = _targets(gen, trn, q) if mode == "gpu" else []
    result = {"mode": mode, "env": envinfo, "steps": steps, "generate": gen, "train": trn,
              "tests": tests, "quality": q, "targets": targets}
    md = _markdown(mode, envinfo, steps, gen, trn, targets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(md)
    print(md, end="")
    return sum(not s["status"].startswith("ok") for s in steps)


def _targets(gen: list[dict], trn: list[dict], q: dict) -> list[dict]:
    out = []

    def row(what: str, value: float | None, target: float, unit: str) -> None:
        met = None if value is None or math.isnan(value) else value >= target
        shown = _fmt_sps(target) if target >= 1000 else f"{target:g}"
        out.append({"what": what, "target": f">= {shown}{unit}", "value": value, "met": met})

    for b in ("s4d", "s4", "mamba"):
        for batch, key, label in ((1, "realtime", "x real time"), (32, "aggregate", "x aggregate")):
            r = [x for x in gen if x["kind"] == "generate" and x.get("engine") == "cuda-graph"
                 and x["preset"] == "ablated" and x["backend"] == b and x["batch"] == batch
                 and key in x]
            row(f"cuda-graph ablated {b} batch {batch}", r[0][key] if r else None,
                TARGETS["gen_b1" if batch == 1 else "gen_b32"], label)
    for b in ("s4d", "s4", "mamba"):
        r = [x for x in trn if x["preset"] == "ablated" and x["backend"] == b and "error" not in x]
        row(f"training ablated {b}", r[0]["samples_per_s"] if r else None, TARGETS["train_sps"],
            " samples/s")
    held = q.get("held_out_bpb")
    out.append({"what": f"held-out piece after {q.get('minutes', float('nan')):.1f} min "
                        "(target is for 5 min)", "target": f"<= {TARGETS['held_out_bpb']}",
                "value": held, "met": None if held is None else held <= TARGETS["held_out_bpb"]})
    return out


def _markdown(mode: str, envinfo: dict, steps: list[dict], gen: list[dict], trn: list[dict],
              targets: list[dict]) -> str:
    lines = [f"# ssmgen GPU check ({'CPU dry run' if mode == 'cpu' else 'GPU'}): "
             f"{envinfo.get('device', '?')}, torch {envinfo.get('torch', '?')}", ""]
    rows = [r for r in gen if r["kind"] == "generate"]
    if rows:
        lines += ["| preset | backend | engine | batch | samples/s | x real time | aggregate | "
                  "first call s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['preset']} | {r['backend']} | {r['engine']} | {r['batch']} | "
                             f"failed: {r['error'][:60]} | | | |")
            else:
                lines.append(f"| {r['preset']} | {r['backend']} | {r['engine']} | {r['batch']} | "
                             f"{r['samples_per_s']:,.0f} | {r['realtime']:.3f}x | "
                             f"{r['aggregate']:.2f}x | {r['first_call_s']:.2f} |")
        lines.append("")
    prompts = [r for r in gen if r["kind"] == "prompt"]
    if prompts:
        reads = [f"{r['preset']}/{r['backend']} "
                 + (f"{r['read_s']:.3f} s" if "read_s" in r else "failed") for r in prompts]
        lines.append(f"prompt read ({prompts[0]['prompt_seconds']:g} s of audio): "
                     + ", ".join(reads))
        lines.append("")
    if trn:
        lines += ["| train preset | backend | batch x length | amp | samples/s | peak MB |",
                  "| --- | --- | --- | --- | ---: | ---: |"]
        for r in trn:
            if "error" in r:
                lines.append(f"| {r['preset']} | {r['backend']} | | | "
                             f"failed: {r['error'][:60]} | |")
            else:
                lines.append(f"| {r['preset']} | {r['backend']} | {r['batch']} x {r['length']} | "
                             f"{r['amp']} | {r['samples_per_s']:,.0f} | {r['peak_mb']:,.0f} |")
        lines.append("")
    if targets:
        lines += ["| target | wanted | measured | met |", "| --- | --- | ---: | --- |"]
        for t in targets:
            v = t["value"]
            shown = "n/a" if v is None else f"{v:,.0f}" if v >= 1000 else f"{v:.3f}"
            met = "?" if t["met"] is None else "yes" if t["met"] else "no"
            lines.append(f"| {t['what']} | {t['target']} | {shown} | {met} |")
        lines.append("")
    lines += ["| step | status | s | figures |", "| --- | --- | ---: | --- |"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {s['figures']} |")
    failed = sum(not s["status"].startswith("ok") for s in steps)
    lines += ["", f"{len(steps) - failed} of {len(steps)} steps ok"
              + (f", {failed} FAIL" if failed else ""), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["missing", "env", "report"])
    ap.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--work", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    args = ap.parse_args()
    if args.what == "missing":
        print(" ".join(missing()))
    elif args.what == "env":
        sys.exit(env(args.mode, args.work))
    else:
        sys.exit(min(report(args.mode, args.work, args.out), 1))


if __name__ == "__main__":
    main()
