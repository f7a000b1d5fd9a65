"""onnxruntime speed of the exported block graph: samples/s at batch 1 on one intra-op thread.

    .venv/bin/python bench/export.py [--preset ablated] [--backend s4d s4 mamba] [--seconds 2]

Random weights (speed does not depend on them). The graph is exported as `ssmgen export` does it
(verification skipped: the tests cover it). Each run generates --seconds of audio from a zero
state, sampling from fresh Gumbel noise, with plain `session.run` and with IOBinding (states kept
as OrtValues and swapped between frames); median of 3 runs each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(preset: str, backend: str, path: Path, opset: int) -> int:
    from ssmgen import export as E
    from ssmgen.config import load_config
    from ssmgen.model import SaShiMi

    torch.manual_seed(0)
    model = SaShiMi(load_config(preset, backend=backend).model).eval()
    path.write_bytes(E._trace(model, opset, True))  # the graph's bytes, as `export_onnx` gets them
    return sum(p.numel() for p in model.parameters())


def run_plain(sess, names, shapes, n_frames: int, rng) -> float:
    states = {f"state.{n}": np.zeros([1 if d == "B" else d for d in shapes[n]], np.float32)
              for n in names}
    token = np.full(1, 128, np.int64)
    inv_t = np.array(1.0, np.float32)
    forced, mask = np.zeros((16, 1), np.int64), np.zeros((16, 1), bool)
    t0 = time.perf_counter()
    for _ in range(n_frames):
        noise = rng.gumbel(size=(16, 1, 256)).astype(np.float32)
        res = sess.run(None, {"token": token, "noise": noise, "inv_temperature": inv_t,
                              "forced": forced, "mask": mask, **states})
        token = res[0][-1]
        states = {f"state.{n}": v for n, v in zip(names, res[2:])}
    return time.perf_counter() - t0


def run_binding(sess, names, shapes, n_frames: int, rng) -> float:
    import onnxruntime as ort

    def ov(a):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))

    zero = {n: np.zeros([1 if d == "B" else d for d in shapes[n]], np.float32) for n in names}
    cur = {n: ov(zero[n]) for n in names}
    nxt = {n: ov(zero[n]) for n in names}
    token, tokens = ov(np.full(1, 128, np.int64)), ov(np.zeros((16, 1), np.int64))
    logits = ov(np.zeros((16, 1, 256), np.float32))
    noise = ov(np.zeros((16, 1, 256), np.float32))
    fixed = {"inv_temperature": ov(np.array(1.0, np.float32)),
             "forced": ov(np.zeros((16, 1), np.int64)), "mask": ov(np.zeros((16, 1), bool))}
    io = sess.io_binding()
    for k, v in fixed.items():
        io.bind_ortvalue_input(k, v)
    io.bind_ortvalue_input("noise", noise)
    io.bind_ortvalue_output("tokens", tokens)
    io.bind_ortvalue_output("logits", logits)
    t0 = time.perf_counter()
    for _ in range(n_frames):
        noise.update_inplace(rng.gumbel(size=(16, 1, 256)).astype(np.float32))
        io.bind_ortvalue_input("token", token)
        for n in names:
            io.bind_ortvalue_input(f"state.{n}", cur[n])
            io.bind_ortvalue_output(f"next.{n}", nxt[n])
        sess.run_with_iobinding(io)
        token.update_inplace(tokens.numpy()[-1])
        cur, nxt = nxt, cur
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ablated")
    ap.add_argument("--backend", nargs="+", default=["s4d", "s4", "mamba"])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--opset", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import json

    import onnxruntime as ort

    from ssmgen import export as E
    from ssmgen.model import SaShiMi

    rate = 16000
    n_frames = int(a.seconds * rate) // 16
    print(f"onnxruntime {ort.__version__}, batch 1, 1 intra-op thread, {a.seconds:g} s per run, "
          f"median of {a.repeats}")
    for backend in a.backend:
        try:
            __import__(f"ssmgen.backends.{backend}")
        except ImportError:
            print(f"{backend}: backend module absent, skipped")
            continue
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.onnx"
            t0 = time.perf_counter()
            params = build(a.preset, backend, path, a.opset)
            export_s = time.perf_counter() - t0
            sess = E.session(path, threads=1)
            from ssmgen.config import load_config
            model = SaShiMi(load_config(a.preset, backend=backend).model)
            names = model.state_names()
            shapes = {k: v for k, v in E.state_shapes(model).items()}
            shapes = json.loads(json.dumps(shapes))
            rng = np.random.default_rng(0)
            run_plain(sess, names, shapes, 20, rng)  # warm-up
            for label, fn in (("run", run_plain), ("iobinding", run_binding)):
                times = [fn(sess, names, shapes, n_frames, rng) for _ in range(a.repeats)]
                med = statistics.median(times)
                sps = n_frames * 16 / med
                print(f"{a.preset} {backend} ({params:,} params, export {export_s:.1f} s, "
                      f"{path.stat().st_size / 1e6:.1f} MB) {label}: {sps:,.0f} samples/s, "
                      f"{sps / rate:.3f}x real time "
                      f"(runs {', '.join(f'{t:.2f}' for t in times)} s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
