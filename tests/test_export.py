"""`ssmgen export`: the recurrent step as ONNX, verified against torch; the torch-free consumer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import BACKENDS, make_checkpoint, perturb, ssmgen, write_tone
from ssmgen.checkpoint import load_model
from ssmgen.errors import UserError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ssmgen import export as E  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "onnx_continue.py"


@pytest.fixture(scope="module")
def s4d(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(d / "model.pt", "s4d")
    summary = E.export_onnx(ckpt, d / "model.onnx", verify_steps=256)
    return ckpt, d / "model.onnx", summary


# --- export + verification per backend ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_export_matches_torch_over_2048_steps(tmp_path, backend):
    ckpt = make_checkpoint(tmp_path / "m.pt", backend)
    r = E.export_onnx(ckpt, tmp_path / "m.onnx", verify_steps=2048)
    assert r["steps_verified"] >= 2048 and r["tokens_identical"]
    assert r["max_logit_diff"] <= 1e-4
    assert r["backend"] == backend and r["graph"] == "block"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]  # no temp file left
    # The block graph is `model.step` traced as it is: its pool buffers must stay scatter-free.
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"ScatterND", "ScatterElements", "Scatter"}, ops

    # An independent run at batch 1 (verification ran at batch 2), forced then sampled.
    model, _ = load_model(ckpt)
    sess = E.session(tmp_path / "m.onnx")
    names = model.state_names()
    rng = np.random.default_rng(1)
    state = model.initial_state(1)
    feeds_state = {f"state.{n}": v.numpy() for n, v in state.tensors.items()}
    token = torch.full((1,), 128)
    ort_token = np.full(1, 128, np.int64)
    from ssmgen.generate.sampling import select_torch
    with torch.no_grad():
        for b in range(8):
            noise = (-np.log(-np.log(rng.random((16, 1, 256))))).astype(np.float32)
            forced = rng.integers(0, 256, (16, 1))
            mask = np.full((16, 1), b < 2)
            res = sess.run(None, {"token": ort_token, "noise": noise, "forced": forced,
                                  "mask": mask, "inv_temperature": np.array(1.25, np.float32),
                                  **feeds_state})
            for i in range(16):
                logits, state = model.step(token, state)
                token = select_torch(logits, torch.from_numpy(noise[i]), 1.25)
                if mask[i, 0]:
                    token = torch.from_numpy(forced[i])
                assert res[0][i, 0] == token.item()
                assert np.abs(res[1][i] - logits.numpy()).max() <= 1e-4
            ort_token = res[0][-1]
            feeds_state = {f"state.{n}": v for n, v in zip(names, res[2:])}
    for n, v in zip(names, res[2:]):
        assert np.abs(v - state.tensors[n].numpy()).max() <= 1e-4, n


def test_single_step_graph_any_phase(tmp_path, s4d):
    ckpt, _, _ = s4d
    r = E.export_onnx(ckpt, tmp_path / "one.onnx", block=False, verify_steps=100)
    assert r["graph"] == "single" and r["steps_verified"] == 100 and r["max_logit_diff"] <= 1e-4
    meta = E.session(tmp_path / "one.onnx").get_modelmeta().custom_metadata_map
    assert meta["graph"] == "single"


def test_metadata_names_real_tensors_and_argmax_at_temperature_zero(s4d):
    ckpt, path, summary = s4d
    model, data = load_model(ckpt)
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    names = model.state_names()
    assert meta["sample_rate"] == "16000" and meta["encoding"] == "mulaw"
    assert meta["normalization"] == "peak" and meta["backend"] == "s4d"
    assert meta["preset"] == "tiny" and meta["block_size"] == "16"
    assert meta["opset"] == str(E.DEFAULT_OPSET) and meta["ssmgen.version"]
    assert json.loads(meta["state_names"]) == names == summary["state_names"]
    shapes = json.loads(meta["state_shapes"])
    assert shapes["down0"] == ["B", 4, 16] and shapes["tier0.0.re"] == ["B", 16, 8]
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    first = ["token", "noise", "inv_temperature", "forced", "mask"]
    assert ins == first + [f"state.{n}" for n in names]
    assert outs == ["tokens", "logits"] + [f"next.{n}" for n in names]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"  # dynamic batch
    real = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL}
    for t in list(m.graph.input) + list(m.graph.output):
        assert t.type.tensor_type.elem_type in real, t.name
    for t in m.graph.initializer:
        assert t.data_type not in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)

    # Temperature 0 (inv_temperature 0): argmax, the noise ignored.
    sess = E.session(path)
    st = {f"state.{n}": v.numpy() for n, v in model.initial_state(3).tensors.items()}
    noise = np.random.default_rng(0).gumbel(size=(16, 3, 256)).astype(np.float32) * 100
    res = sess.run(None, {"token": np.array([5, 128, 250]), "noise": noise,
                          "inv_temperature": np.array(0, np.float32),
                          "forced": np.zeros((16, 3), np.int64), "mask": np.zeros((16, 3), bool),
                          **st})
    np.testing.assert_array_equal(res[0], res[1].argmax(-1))


def test_a_mismatch_is_an_error_and_leaves_no_file(tmp_path, s4d, monkeypatch):
    ckpt, path, _ = s4d
    model, _ = load_model(ckpt)
    perturb(model, scale=0.2, seed=7)  # torch now differs from the exported graph
    with pytest.raises(E.ExportVerificationError):
        E.verify(model, path, steps=64)

    def bad(*a, **k):
        raise E.ExportVerificationError("differs")
    monkeypatch.setattr(E, "verify", bad)
    with pytest.raises(E.ExportVerificationError):
        E.export_onnx(ckpt, tmp_path / "x.onnx", verify_steps=16)
    assert list(tmp_path.iterdir()) == []


# --- the torch-free consumer ----------------------------------------------------------------------

WRAPPER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
bad = [m for m in ("torch", "ssmgen") if m in sys.modules]
assert not bad, f"imported {bad}"
print("NO-TORCH-OK")
"""


def test_onnx_continue_matches_ssmgen_continue_without_torch(tmp_path, s4d):
    from ssmgen.adapt import Adaptation
    from ssmgen.generate.continuation import continue_song

    ckpt, path, _ = s4d
    song = write_tone(tmp_path / "song.wav", seconds=0.6, rate=22050, channels=2)  # resampled
    opts = dict(seconds=0.25, temperature=0.8, seed=3, prompt_seconds=0.3)
    continue_song(song, ckpt, out=tmp_path / "ref.wav", engine="torch", progress=False,
                  adapt=Adaptation(passes=0), **opts)  # the exported model, as trained
    p = subprocess.run([sys.executable, "-c", WRAPPER, str(EXAMPLE), str(song), "--model",
                        str(path), "--out", str(tmp_path / "onnx.wav"), "--seconds", "0.25",
                        "--prompt-seconds", "0.3", "--temp", "0.8", "--seed", "3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "NO-TORCH-OK" in p.stdout
    ref, rate = sf.read(str(tmp_path / "ref.wav"), dtype="int16")
    got, rate2 = sf.read(str(tmp_path / "onnx.wav"), dtype="int16")
    assert rate == rate2 == 16000
    assert len(ref) == len(got) == int(0.3 * 16000) + 4000
    np.testing.assert_array_equal(got, ref)  # prompt and the new 0.25 s, sample for sample
    assert len(np.unique(got[-4000:])) > 20  # really sampled, not silence


# --- errors ---------------------------------------------------------------------------------------

def test_errors_are_one_line_user_errors(tmp_path, s4d):
    ckpt, _, _ = s4d
    (tmp_path / "x.pt").write_text("not a checkpoint\n")
    (tmp_path / "file").write_text("")
    cases = [(tmp_path / "missing.pt", tmp_path / "a.onnx"),
             (tmp_path / "x.pt", tmp_path / "a.onnx"),
             (ckpt, tmp_path / "file" / "a.onnx"),  # the folder is a file
             (ckpt, tmp_path / "no" / "such" / "a.onnx"),
             (ckpt, tmp_path)]  # a folder
    for src, out in cases:
        with pytest.raises(UserError) as e:
            E.export_onnx(src, out)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="opset"):
        E.export_onnx(ckpt, tmp_path / "a.onnx", opset=99)
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.parametrize("case", ["missing", "foreign", "unwritable"])
def test_cli_errors_exit_2_without_traceback(tmp_path, s4d, case):
    ckpt, _, _ = s4d
    (tmp_path / "x.pt").write_text("not a checkpoint\n")
    (tmp_path / "file").write_text("")
    src, out = {"missing": (tmp_path / "nope.pt", tmp_path / "m.onnx"),
                "foreign": (tmp_path / "x.pt", tmp_path / "m.onnx"),
                "unwritable": (ckpt, tmp_path / "file" / "m.onnx")}[case]
    p = ssmgen("export", src, "--out", out)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_cli_export_writes_and_reports(tmp_path, s4d):
    ckpt, _, _ = s4d
    p = ssmgen("export", ckpt, "--out", tmp_path / "m.onnx", "--verify-steps", "32")
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "identical tokens" in p.stdout
    assert (tmp_path / "m.onnx").is_file()
