"""`export_onnx()`: the model's recurrent step as an ONNX graph, verified against torch.

Two graphs (one per file):

- **block** (default): one frame of 16 samples from frame phase 0 (every tier's schedule is fixed
  within a frame), sampling included. Inputs: ``token`` (B,) int64, the input of the frame's first
  step; ``noise`` (16, B, 256) float32 Gumbel noise; ``inv_temperature`` () float32 (1 /
  temperature; 0 means argmax); ``forced`` (16, B) int64 and ``mask`` (16, B) bool: the input of
  step i + 1 is ``forced[i]`` where ``mask[i]``, else the token sampled at step i (this is how a
  prompt is read through the same graph); then every state tensor ``state.<name>``. Outputs:
  ``tokens`` (16, B) int64 (the inputs of steps 1..16, so ``tokens[-1]`` is the next frame's
  ``token``), ``logits`` (16, B, 256) float32, and ``next.<name>`` for every state tensor.
- **single**: one sample at any phase. Inputs ``token`` (B,), ``t`` () int64 (samples consumed so
  far; only t % 16 matters), the states; outputs ``logits`` (B, 256) and the next states. Every tier
  is computed at every step and the schedule applied with masks, so it is slower than the block.

Sampling is Gumbel-max, ``argmax(logits * inv_temperature + noise)``, exactly as
`ssmgen.generate.sampling` (no top-k / top-p in the graph). State names are `SaShiMi.state_names()`
(``tier0.0.re``, ..., ``down0``, ``up0``, ...); batch is a dynamic axis. Everything a consumer needs
(rate, encoding, normalization, state shapes, the noise recipe) is in the model's metadata_props.

The graph is exported with the TorchScript tracer (``dynamo=False``): the block graph is
`SaShiMi.step` itself, looped over a frame at static phases (the model's own schedule), a fixed,
unrolled sequence of real ops, which is exactly what tracing captures; the single-step graph runs
the same operations with the schedule evaluated on the phase tensor (`masked_step`). The step
caches (discretized parameters) are computed once beforehand and enter the graph as constants
(`frozen_step_caches`). The parallel prompt read
(`forward_with_state`) is not exported: it uses FFTs (S4, S4D) that the exporters do not cover, so
prompts are read through the block graph with forced tokens.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssmgen import __version__
from ssmgen.atomic import atomic_output, check_output
from ssmgen.errors import UserError
from ssmgen.model import ModelState
from ssmgen.tokens import N_TOKENS, SILENCE_TOKEN
from ssmgen.validate import number

DEFAULT_OPSET = 20
NOISE_RECIPE = ("per batch row b: numpy Generator(PCG64(seed + b)) (variation b of `ssmgen "
                "continue --seed seed` is `--seed seed+b --num 1`); per step draw "
                f"random((1, {N_TOKENS})) float64 u, noise = float32(-log(-log(u))); only "
                "generated steps consume noise (prompt steps do not)")


class ExportVerificationError(RuntimeError):
    """onnxruntime and torch disagree on the exported graph (a bug, not a user mistake)."""


# ------------------------------------------------------------------------------------------------
# The graphs as torch modules
# ------------------------------------------------------------------------------------------------

def select(logits: Tensor, noise: Tensor, inv_temperature: Tensor) -> Tensor:
    """Gumbel-max as `sampling.select_torch` without top-k/top-p: argmax of the logits when
    inv_temperature is 0, else of logits * inv_temperature + noise."""
    z = torch.where(inv_temperature > 0, logits * inv_temperature + noise, logits)
    return z.argmax(-1)


class BlockGraph(nn.Module):
    """One frame of `model.frame` steps from phase 0, sampling and forced tokens included: simply
    `model.step` looped, so the schedule is the model's own and static (python ints) for each of
    the frame's steps. `model.step` keeps its pool buffers in a traceable form (constant slot
    masks, flattens and reshapes by constants), so the graph has no scatter and no shape
    arithmetic, and batch stays dynamic."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.names = model.state_names()

    def forward(self, token, noise, inv_temperature, forced, mask, *states):
        state = ModelState(0, dict(zip(self.names, states)))
        tokens, logits_all = [], []
        for i in range(self.model.frame):
            logits, state = self.model.step(token, state)
            token = torch.where(mask[i], forced[i], select(logits, noise[i], inv_temperature))
            tokens.append(token)
            logits_all.append(logits)
        return (torch.stack(tokens), torch.stack(logits_all),
                *(state.tensors[n] for n in self.names))


class SingleGraph(nn.Module):
    """One sample at any phase `t`: every tier runs, the schedule is applied with masks."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.names = model.state_names()

    def forward(self, token, t, *states):
        logits, new = masked_step(self.model, token, t, dict(zip(self.names, states)))
        return (logits, *(new[n] for n in self.names))


def masked_step(model, token: Tensor, t: Tensor, S: dict[str, Tensor]):
    """`model.step` with the phase as a tensor, for a graph that serves every phase: the schedule
    is `model.schedule(t)` evaluated on the tensor (the model's one schedule), every tier and pool
    is computed with `model.step`'s own operations, and `torch.where` keeps what the schedule
    says did not change (a tier that does not run keeps its states; a pool that is not written
    or pooled keeps its buffer)."""
    npool = len(model.cfg.pool)
    top, pos = model.schedule(t)
    runs: list[Tensor | None] = [None] + [top >= i for i in range(1, npool + 1)]  # None: always
    new = dict(S)
    xs = [model.embedding(token)]
    for i, down in enumerate(model.down):
        old = S[f"down{i}"]
        buf = down.put(old, xs[-1], pos[i])
        xs.append(down.pool_buffer(buf))  # used only where tier i + 1 runs
        written = torch.where(runs[i + 1], torch.zeros_like(buf), buf)
        new[f"down{i}"] = written if runs[i] is None else torch.where(runs[i], written, old)
    y = _masked_tier(model, npool, xs[npool], S, new, runs[npool])
    for i in reversed(range(npool)):
        old = S[f"up{i}"]
        piece = model.up[i].piece(old, pos[i])
        new[f"up{i}"] = torch.where(runs[i + 1], model.up[i].pieces(y), old)
        y = _masked_tier(model, i, piece + xs[i], S, new, runs[i])
    return model.output_step(y, token, S, new), new


def _masked_tier(model, level, x, S, new, run):
    out: dict[str, Tensor] = {}
    y = model._step_tier(level, x, S, out)
    for k, v in out.items():
        new[k] = v if run is None else torch.where(run, v, S[k])
    return y


@contextmanager
def frozen_step_caches(model):
    """While tracing, serve every backend's step caches as constants: one eager frame of steps
    (every tier runs in a frame) records what each layer's `step_cache` returned, slot by slot,
    detached; tracing then gets those values (the caches' python-level staleness checks must not
    run on traced values, and a cached view of a parameter must not enter the graph as a
    parameter)."""
    from ssmgen.backends import SequenceBackend

    layers = [m for m in model.modules() if isinstance(m, SequenceBackend)]
    recorded: dict[int, dict[str, Any]] = {id(m): {} for m in layers}

    def recorder(m):
        real = m.step_cache

        def step_cache(prepare=None, slot="step"):
            value = real(prepare, slot)
            recorded[id(m)][slot] = _detached(value)
            return value
        return step_cache

    def server(m):
        def step_cache(prepare=None, slot="step"):
            return recorded[id(m)][slot]
        return step_cache

    try:
        for m in layers:
            m.__dict__["step_cache"] = recorder(m)
        with torch.no_grad():
            state = model.initial_state(1)
            token = torch.full((1,), SILENCE_TOKEN, dtype=torch.long)
            for _ in range(model.frame):
                _, state = model.step(token, state)
        for m in layers:
            m.__dict__["step_cache"] = server(m)
        yield
    finally:
        for m in layers:
            m.__dict__.pop("step_cache", None)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

def _check_backend(model) -> None:
    from ssmgen.backends import SequenceBackend

    for m in model.modules():
        if isinstance(m, SequenceBackend):
            if any(p.is_complex() for p in m.parameters()):
                raise UserError(f"backend '{model.cfg.backend}' cannot be exported to ONNX: it "
                                "has complex parameters")
            return


def state_shapes(model) -> dict[str, list]:
    """Each state tensor's shape with the batch axis as 'B'."""
    st = model.initial_state(1)
    return {k: ["B", *v.shape[1:]] for k, v in st.tensors.items()}


def export_onnx(checkpoint, out, *, opset: int = DEFAULT_OPSET, block: bool = True,
                verify_steps: int = 2048, force: bool = False) -> dict[str, Any]:
    """Export the recurrent step of the model in `checkpoint` (file or run folder) to `out` (.onnx),
    then verify it: onnxruntime and torch run the same inputs for `verify_steps` steps; logits must
    agree within 1e-4 and sampled tokens exactly, else ExportVerificationError. The file is written
    under `ssmgen.atomic`'s rules (a temp file renamed once verified; an existing file replaced
    only with `force`, never a non-regular file or the checkpoint). Returns a summary."""
    from ssmgen.checkpoint import load_model, resolve

    out = Path(out)
    number("--opset", opset, low=9, high=20, integer=True)
    number("--verify-steps", verify_steps, low=16, high=1 << 20, integer=True)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("export needs onnx and onnxruntime: pip install 'ssmgen[onnx]'") from None
    inputs = [resolve(checkpoint)]
    check_output(out, force=force, inputs=inputs)
    model, ckpt = load_model(checkpoint, "cpu")
    _check_backend(model)
    model.eval()
    names = model.state_names()

    t0 = time.perf_counter()
    with atomic_output(out, replace=force, inputs=inputs) as tmp:  # never a graph that fails
        graph = _with_metadata(_trace(model, opset, block), _metadata(model, ckpt, opset, block))
        with open(tmp, "wb") as f:  # a full disk is an OSError here, reported as such
            f.write(graph)
        export_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        check = verify(model, str(tmp), block=block, steps=verify_steps)
        verify_s = time.perf_counter() - t1
    return {"path": str(out), "checkpoint": ckpt["path"], "graph": "block" if block else "single",
            "backend": model.cfg.backend, "opset": opset, "block_size": model.frame,
            "size_bytes": out.stat().st_size, "state_names": names,
            "max_logit_diff": check["max_logit_diff"], "steps_verified": check["steps"],
            "tokens_identical": check["tokens_identical"], "export_s": export_s,
            "verify_s": verify_s}


def _dummy_inputs(model, block: bool, batch: int = 2):
    st = model.initial_state(batch)
    states = tuple(st.tensors.values())
    token = torch.full((batch,), SILENCE_TOKEN, dtype=torch.long)
    if not block:
        return (token, torch.tensor(5, dtype=torch.long), *states)
    F = model.frame
    return (token, torch.zeros(F, batch, N_TOKENS), torch.tensor(1.0),
            torch.zeros(F, batch, dtype=torch.long), torch.zeros(F, batch, dtype=torch.bool),
            *states)


def io_names(model, block: bool) -> tuple[list[str], list[str]]:
    names = model.state_names()
    first_in = ["token", "noise", "inv_temperature", "forced", "mask"] if block else ["token", "t"]
    first_out = ["tokens", "logits"] if block else ["logits"]
    return (first_in + [f"state.{n}" for n in names], first_out + [f"next.{n}" for n in names])


def _trace(model, opset: int, block: bool) -> bytes:
    """The traced graph as the bytes of an .onnx file (in memory: the exporter's own file writing
    would hide a full disk)."""
    inputs, outputs = io_names(model, block)
    graph = BlockGraph(model) if block else SingleGraph(model)
    k = len(model.state_names())
    dyn = {n: {0: "B"} for n in inputs[-k:] + outputs[-k:]}
    dyn["token"] = {0: "B"}
    if block:
        dyn.update(noise={1: "B"}, forced={1: "B"}, mask={1: "B"}, tokens={1: "B"},
                   logits={1: "B"})
    else:
        dyn["logits"] = {0: "B"}
    buf = io.BytesIO()
    with frozen_step_caches(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, _dummy_inputs(model, block), buf, dynamo=False,
                          opset_version=opset, input_names=inputs, output_names=outputs,
                          dynamic_axes=dyn, do_constant_folding=True)
    return buf.getvalue()


def _metadata(model, ckpt: dict, opset: int, block: bool) -> dict[str, str]:
    fmt = ckpt["data_format"]
    inputs, outputs = io_names(model, block)
    return {
        "ssmgen.format": "ssmgen-onnx-step",
        "ssmgen.version": __version__,
        "graph": "block" if block else "single",
        "sample_rate": str(int(fmt["rate"])),
        "encoding": str(fmt["encoding"]),
        "bits": str(int(fmt.get("bits", 8))),
        "normalization": str(fmt["normalization"]),
        "preset": str(ckpt["config"].get("preset", "custom")),
        "backend": model.cfg.backend,
        "block_size": str(model.frame),
        "pool": json.dumps(list(model.cfg.pool)),
        "n_tokens": str(model.cfg.n_tokens),
        "silence_token": str(SILENCE_TOKEN),
        "state_names": json.dumps(model.state_names()),
        "state_shapes": json.dumps(state_shapes(model)),
        "inputs": json.dumps(inputs),
        "outputs": json.dumps(outputs),
        "opset": str(opset),
        "checkpoint_step": str(int(ckpt.get("step", 0))),
        "sampling": "token = argmax(logits * inv_temperature + noise); argmax(logits) when "
                    "inv_temperature == 0; inv_temperature = float32(1 / temperature)",
        "noise": NOISE_RECIPE,
        "prompt": f"inputs of steps 0..T-1 are {SILENCE_TOKEN} then prompt[0..T-2]: start with "
                  f"token {SILENCE_TOKEN}, forced[i] = prompt[i] with mask true for i < T, then "
                  "sample",
    }


def _with_metadata(graph: bytes, meta: dict[str, str]) -> bytes:
    import onnx

    m = onnx.load_from_string(graph)
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.doc_string = "ssmgen SaShiMi recurrent step (see metadata_props)"
    return m.SerializeToString()


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------

def session(path: str | os.PathLike, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify(model, path, *, block: bool = True, steps: int = 2048, batch: int = 2, seed: int = 0,
           tol: float = 1e-4) -> dict[str, Any]:
    """Run torch (`model.step` + the sampler's selection) and onnxruntime side by side for `steps`
    steps from the initial state, each on its own chain of states. The first quarter of the steps
    is forced (as a prompt is read), the rest sampled at temperature 1 from the same noise.
    Raises ExportVerificationError on a token mismatch or a logit difference above `tol`."""
    from ssmgen.generate.continuation import single_thread
    from ssmgen.generate.sampling import select_torch

    sess = session(path)
    names = model.state_names()
    rng = np.random.default_rng(seed)
    F = model.frame if block else 1
    n_blocks = max(1, math.ceil(steps / F))
    total = n_blocks * F
    forced = rng.integers(0, N_TOKENS, (total, batch)).astype(np.int64)
    mask = np.zeros((total, batch), bool)
    mask[: total // 4] = True
    u = rng.random((total, batch, N_TOKENS))
    noise = (-np.log(-np.log(u))).astype(np.float32)
    inv_t = np.float32(1.0)

    state = model.initial_state(batch)
    ort_states = [v.numpy().copy() for v in state.tensors.values()]
    token = torch.full((batch,), SILENCE_TOKEN, dtype=torch.long)
    ort_token = token.numpy().copy()
    worst = 0.0
    with single_thread():
        for b in range(n_blocks):
            sl = slice(b * F, (b + 1) * F)
            ref_tokens, ref_logits = [], []
            for i in range(b * F, (b + 1) * F):
                logits, state = model.step(token, state)
                sampled = select_torch(logits, torch.from_numpy(noise[i]), float(inv_t))
                token = torch.where(torch.from_numpy(mask[i]), torch.from_numpy(forced[i]), sampled)
                ref_tokens.append(token.numpy())
                ref_logits.append(logits.numpy())
            if block:
                feeds = {"token": ort_token, "noise": noise[sl],
                         "inv_temperature": np.array(inv_t, np.float32),
                         "forced": forced[sl], "mask": mask[sl]}
            else:
                feeds = {"token": ort_token, "t": np.array(b, np.int64)}
            feeds.update({f"state.{n}": s for n, s in zip(names, ort_states)})
            res = sess.run(None, feeds)
            if block:
                got_tokens, got_logits, ort_states = res[0], res[1], res[2:]
            else:
                got_logits, ort_states = res[0][None], res[1:]
                sampled = select_torch(torch.from_numpy(res[0]), torch.from_numpy(noise[b]),
                                       float(inv_t)).numpy()
                got_tokens = np.where(mask[b], forced[b], sampled)[None]
            diff = float(np.max(np.abs(got_logits - np.stack(ref_logits))))
            worst = max(worst, diff)
            if not np.array_equal(got_tokens, np.stack(ref_tokens)):
                raise ExportVerificationError(
                    f"onnxruntime and torch sampled different tokens at steps "
                    f"{b * F}..{b * F + F - 1}"
                    f" (max logit difference so far {worst:.2e})")
            if not diff <= tol:
                raise ExportVerificationError(
                    f"onnxruntime and torch logits differ by {diff:.2e} (> {tol:g}) at steps "
                    f"{b * F}..{b * F + F - 1}")
            ort_token = got_tokens[-1]
    return {"steps": total, "max_logit_diff": worst, "tokens_identical": True, "batch": batch}
