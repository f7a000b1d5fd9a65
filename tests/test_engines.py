"""Generation engines and sampling: cpu-fast reproduces the torch reference token for token."""

import numpy as np
import pytest
import torch

from helpers import BACKENDS, perturb, require_backend
from ssmgen.config import load_config
from ssmgen.errors import UserError
from ssmgen.generate import Sampler, available_engines, create_engine
from ssmgen.generate.cpu_fast_kernels import select_token
from ssmgen.generate.sampling import allowed_mask_torch, select_torch
from ssmgen.model import SaShiMi

B = 2


def tiny(name, seed=0, pool=None, d_state=None):
    require_backend(name)
    torch.manual_seed(seed)
    extra = [f"model.pool={pool}", "train.sample_len=2112"] if pool else []  # 2112 = 96 * 22
    if d_state:
        extra.append(f"model.backend_options.{name}.d_state={d_state}")
    cfg = load_config("tiny", backend=name, overrides=["model.n_layers=2", *extra]).model
    return perturb(SaShiMi(cfg), scale=0.05, seed=seed).eval()


def prompt_state(model, length=37, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch, length), generator=g)
    with torch.no_grad():
        _, state = model.forward_with_state(tokens, model.initial_state(batch))
    return tokens, state


def run(engine, model, state, first, n, sampler, batch=B):
    eng = create_engine(engine, model, batch, "cpu")
    logits = np.zeros((n, batch, 256), np.float32)
    toks, final = eng.generate(state, first, n, sampler, logits_out=logits)
    return toks, final, logits


def assert_states_close(a, b, tol=1e-4):
    assert a.t == b.t and a.names() == b.names()
    for k in a.tensors:
        assert a.tensors[k].shape == b.tensors[k].shape, k
        assert (a.tensors[k] - b.tensors[k]).abs().max().item() <= tol, k


# --- cpu-fast against the torch reference -------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=40, top_p=0.9)])
def test_cpu_fast_matches_torch(name, sampling):
    model = tiny(name)
    tokens, state = prompt_state(model, length=37)  # odd phase: t % 16 == 5
    first = tokens[:, -1].numpy()
    n = 16 * 3 + 7
    ref = run("torch", model, state, first, n, Sampler(seed=5, batch_size=B, **sampling))
    fast = run("cpu-fast", model, state, first, n, Sampler(seed=5, batch_size=B, **sampling))
    np.testing.assert_array_equal(ref[0], fast[0])
    assert np.abs(ref[2] - fast[2]).max() <= 1e-4
    assert_states_close(ref[1], fast[1])
    assert fast[1].t == 37 + n


@pytest.mark.parametrize("name,d_state", [("s4d", 64), ("s4", 64), ("mamba", 16), ("s4d", 48)])
def test_cpu_fast_matches_torch_with_the_state_in_whole_vectors(name, d_state):
    """The kernels' vector paths (16 modes at a time: N/2 = 32 for S4D and S4, N = 16 for Mamba,
    the sizes of the presets) and, for N/2 = 24, the scalar path beside them."""
    model = tiny(name, seed=3, d_state=d_state)
    tokens, state = prompt_state(model, length=23, batch=3)
    first = tokens[:, -1].numpy()
    n = 16 * 2 + 11
    sampler = lambda: Sampler(seed=4, batch_size=3, temperature=0.9, top_k=50)  # noqa: E731
    ref = run("torch", model, state, first, n, sampler(), batch=3)
    fast = run("cpu-fast", model, state, first, n, sampler(), batch=3)
    np.testing.assert_array_equal(ref[0], fast[0])
    assert np.abs(ref[2] - fast[2]).max() <= 1e-4
    assert_states_close(ref[1], fast[1])


@pytest.mark.parametrize("name,pool", [("s4d", [2, 3]), ("mamba", [4, 2, 2]), ("s4", [3, 1, 2])])
def test_cpu_fast_matches_torch_with_other_pools(name, pool):
    """The kernel takes the model's schedule as a table, whatever the pools."""
    model = tiny(name, pool=pool)
    tokens, state = prompt_state(model, length=29)
    first = tokens[:, -1].numpy()
    n = 5 * model.frame + 3
    ref = run("torch", model, state, first, n, Sampler(seed=3, batch_size=B))
    fast = run("cpu-fast", model, state, first, n, Sampler(seed=3, batch_size=B))
    np.testing.assert_array_equal(ref[0], fast[0])
    assert np.abs(ref[2] - fast[2]).max() <= 1e-4
    assert_states_close(ref[1], fast[1])


def test_cpu_fast_continues_across_calls_and_rows_are_independent_of_batch():
    model = tiny("s4d")
    tokens, state = prompt_state(model, length=21)
    first = tokens[:, -1].numpy()
    eng = create_engine("cpu-fast", model, B, "cpu")
    whole, s_whole = eng.generate(state, first, 40, Sampler(seed=2, batch_size=B))
    sampler = Sampler(seed=2, batch_size=B)
    a, s = eng.generate(state, first, 13, sampler)
    b, s = eng.generate(s, a[:, -1].astype(np.int64), 27, sampler)
    np.testing.assert_array_equal(whole, np.concatenate([a, b], 1))
    assert_states_close(s_whole, s, tol=1e-6)
    # Row 0 alone (batch 1, same state row) is the same audio as row 0 of the batch.
    from ssmgen.model import ModelState
    s0 = ModelState(state.t, {k: v[:1].clone() for k, v in state.tensors.items()})
    one = create_engine("cpu-fast", model, 1, "cpu")
    alone, _ = one.generate(s0, first[:1], 40, Sampler(seed=2, batch_size=1))
    np.testing.assert_array_equal(alone[0], whole[0])


def test_torch_engine_step_matches_forward_teacher_forced():
    model = tiny("s4d")
    first = np.array([3, 250])
    n = 16 * 2 + 3
    toks, final, logits = run("torch", model, model.initial_state(B), first, n,
                              Sampler(seed=0, batch_size=B))
    assert toks.dtype == np.uint8 and toks.shape == (B, n) and final.t == n
    inputs = torch.cat([torch.as_tensor(first)[:, None],
                        torch.as_tensor(toks[:, :-1].astype(np.int64))], 1)
    with torch.no_grad():
        ref = model(inputs).numpy()
    assert np.abs(ref.transpose(1, 0, 2) - logits).max() <= 1e-4


def test_registry():
    model = tiny("s4d")
    assert {"torch", "cpu-fast"} <= set(available_engines("cpu"))
    assert "cuda-graph" not in available_engines("cpu")
    assert create_engine("auto", model, 1, "cpu").name == "cpu-fast"
    assert create_engine("torch", model, 1, "cpu").name == "torch"
    with pytest.raises(UserError, match="unknown engine"):
        create_engine("nope", model, 1, "cpu")
    with pytest.raises(UserError, match="cuda-graph.*CUDA"):
        create_engine("cuda-graph", model, 1, "cpu")


# --- the fast-step contract: what a plug-in must give the cpu-fast engine -------------------------

def plugin_model(name, cls):
    from ssmgen import backends
    backends.register(name, cls)
    torch.manual_seed(0)
    cfg = load_config("tiny", backend=name, overrides=["model.n_layers=2"]).model
    return perturb(SaShiMi(cfg), scale=0.05).eval()


def test_a_plugin_is_packed_by_its_fast_kind_alone():
    """A class the engine has never heard of, with the "s4d" form and a fast_step of its own,
    runs on cpu-fast and matches torch; the same layer without a fast_kind runs on torch only."""
    from ssmgen.backends.s4d import S4D

    class Diagonal(S4D):  # another class: packed because it says "s4d" and follows the layout
        pass

    class Opaque(S4D):
        fast_kind = None

    model = plugin_model("diagonal-test", Diagonal)
    tokens, state = prompt_state(model, length=21)
    first = tokens[:, -1].numpy()
    ref = run("torch", model, state, first, 40, Sampler(seed=1, batch_size=B))
    fast = run("cpu-fast", model, state, first, 40, Sampler(seed=1, batch_size=B))
    np.testing.assert_array_equal(ref[0], fast[0])

    opaque = plugin_model("opaque-test", Opaque)
    assert create_engine("auto", opaque, 1, "cpu").name == "torch"
    with pytest.raises(UserError, match="declares no step form") as e:
        create_engine("cpu-fast", opaque, 1, "cpu")
    assert "\n" not in str(e.value)


def test_a_fast_step_off_its_layout_is_refused_in_one_line():
    from ssmgen.backends.s4d import S4D

    class Wrong(S4D):
        def fast_step(self):
            k = dict(super().fast_step())
            k["dB_im"] = k["dB_im"][:, :-1]
            return k

    model = plugin_model("wrong-test", Wrong)
    with pytest.raises(UserError, match="backend Wrong: .*'dB_im' has shape") as e:
        create_engine("cpu-fast", model, 1, "cpu")
    assert "\n" not in str(e.value)


# --- cuda-graph against the torch reference (where a GPU exists) ---------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=40, top_p=0.9)])
def test_cuda_graph_matches_torch(name, sampling):
    model = tiny(name)
    tokens, state = prompt_state(model, length=37)  # odd phase: eager steps, then frames
    model.cuda()  # the engines move the state to the model's device
    first = tokens[:, -1].numpy()
    n = 1024 + 16 * 3 + 7  # crosses a noise chunk, with eager steps between frames

    def gen(engine):
        eng = create_engine(engine, model, B, "cuda")
        return eng.generate(state, first, n, Sampler(seed=5, batch_size=B, **sampling))
    ref, ref_state = gen("torch")
    fast, fast_state = gen("cuda-graph")
    np.testing.assert_array_equal(ref, fast)
    assert fast_state.t == ref_state.t == 37 + n
    for k in ref_state.tensors:
        torch.testing.assert_close(fast_state.tensors[k], ref_state.tensors[k], atol=1e-4,
                                   rtol=1e-4)


# --- sampling -----------------------------------------------------------------------------------

def test_noise_is_gumbel_and_per_row_independent_of_batch_size():
    s1, s4 = Sampler(seed=7, batch_size=1), Sampler(seed=7, batch_size=4)
    assert s1.seeds[0] == s4.seeds[0] and len(set(s4.seeds)) == 4
    a = np.concatenate([s1.noise(5), s1.noise(11)])  # drawing in pieces = drawing at once
    b = s4.noise(16)
    np.testing.assert_array_equal(a[:, 0], b[:, 0])
    np.testing.assert_array_equal(Sampler(row_seeds=[s4.seeds[2]]).noise(16)[:, 0], b[:, 2])
    g = Sampler(seed=1).noise(2000).ravel()
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - np.pi ** 2 / 6) < 0.03


def test_top_k_1_and_zero_temperature_are_argmax():
    logits = torch.randn(8, 256)
    g = torch.from_numpy(Sampler(seed=0, batch_size=8).noise(1)[0])
    assert torch.equal(select_torch(logits, g, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(select_torch(logits, g, 0.0), logits.argmax(-1))
    assert torch.equal(select_torch(logits, g, 1e4), logits.argmax(-1))  # temperature 1e-4


def test_top_p_keeps_the_smallest_sufficient_set():
    p = torch.tensor([0.5, 0.05, 0.3, 0.1, 0.05] + [0.0] * 251) + 1e-12
    z = p.log()[None]
    keep = allowed_mask_torch(z, 0, 0.75)[0]
    assert set(torch.nonzero(keep).ravel().tolist()) == {0, 2}
    keep = allowed_mask_torch(z, 0, 0.85)[0]
    assert set(torch.nonzero(keep).ravel().tolist()) == {0, 2, 3}
    keep = allowed_mask_torch(z, 2, 1.0)[0]
    assert set(torch.nonzero(keep).ravel().tolist()) == {0, 2}


def test_gumbel_max_samples_follow_softmax():
    n = 20000
    logits = torch.randn(256) * 2
    logits[10:] -= 6  # concentrate the mass on 10 tokens
    g = torch.from_numpy(Sampler(seed=3).noise(n)[:, 0])
    toks = select_torch(logits.expand(n, 256), g, 1.0)
    counts = torch.bincount(toks, minlength=256).double()
    p = torch.softmax(logits.double(), -1)
    big = p * n >= 20
    chi2 = (((counts - n * p) ** 2) / (n * p))[big].sum().item()
    dof = int(big.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5


@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.9, 30, 0.5),
                                    (0.0, 0, 1.0), (0.0, 5, 1.0)])
def test_numba_selection_equals_torch(params):
    inv_t = 0.0 if params[0] == 0 else 1.0 / params[0]
    k, p = params[1], params[2]
    rng = np.random.default_rng(0)
    L = (rng.standard_normal((64, 256)) * 3).astype(np.float32)
    g = Sampler(seed=9, batch_size=64).noise(1)[0]
    ref = select_torch(torch.from_numpy(L), torch.from_numpy(g), inv_t, k, p).numpy()
    z, srt = np.zeros(256, np.float32), np.zeros(256, np.float32)
    got = [select_token(L[i], g[i], inv_t, k, p, z, srt) for i in range(64)]
    np.testing.assert_array_equal(ref, got)



# --- per-row settings (a comparison grid is one batch) -------------------------------------------

ROWS = dict(temperature=[0.0, 0.8, 1.0, 1.3], top_k=[0, 5, 0, 40], top_p=[1.0, 1.0, 0.8, 0.9])
SEEDS = [3, 3, 4, 9]


def test_per_row_selection_equals_each_row_selected_alone():
    from ssmgen.generate.sampling import select_rows
    logits = torch.randn(4, 256) * 3
    sampler = Sampler(row_seeds=SEEDS, **ROWS)
    g = torch.from_numpy(sampler.noise(1)[0])
    got = select_rows(logits, g, sampler.rows("cpu"))
    for b in range(4):
        t = ROWS["temperature"][b]
        alone = select_torch(logits[b:b + 1], g[b:b + 1], 1 / t if t else 0.0, ROWS["top_k"][b],
                             ROWS["top_p"][b])
        assert got[b] == alone[0]
    assert Sampler(seed=7, batch_size=3).seeds == [7, 8, 9]  # row b of --seed S is seed S + b
    np.testing.assert_array_equal(Sampler(seed=8).noise(4)[:, 0],
                                  Sampler(seed=7, batch_size=2).noise(4)[:, 1])


def test_per_row_settings_in_every_engine_and_each_row_alone():
    from ssmgen.model import ModelState
    model = tiny("s4d")
    tokens, state = prompt_state(model, length=21, batch=4)
    first = tokens[:, -1].numpy()
    n = 16 * 2 + 9
    ref = run("torch", model, state, first, n, Sampler(row_seeds=SEEDS, **ROWS), batch=4)
    fast = run("cpu-fast", model, state, first, n, Sampler(row_seeds=SEEDS, **ROWS), batch=4)
    np.testing.assert_array_equal(ref[0], fast[0])
    one = create_engine("cpu-fast", model, 1, "cpu")
    for b in range(4):
        s_b = ModelState(state.t, {k: v[b:b + 1].clone() for k, v in state.tensors.items()})
        alone, _ = one.generate(s_b, first[b:b + 1], n, Sampler(
            row_seeds=[SEEDS[b]], **{k: v[b] for k, v in ROWS.items()}))
        np.testing.assert_array_equal(alone[0], fast[0][b])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("batch", [3, 4])
def test_cpu_fast_batches_with_per_row_settings_match_torch(name, batch):
    """Batches of 3 and 4 (two groups of rows in two threads: 2 + 1, 2 + 2), each row with its
    own temperature, top-k and top-p: cpu-fast is torch token for token, logits within 1e-4."""
    model = tiny(name, seed=2)
    tokens, state = prompt_state(model, length=27, batch=batch)
    first = tokens[:, -1].numpy()
    n = 16 * 3 + 5
    rows = {k: v[:batch] for k, v in ROWS.items()}

    def sampler():
        return Sampler(row_seeds=SEEDS[:batch], **rows)
    ref = run("torch", model, state, first, n, sampler(), batch=batch)
    fast = run("cpu-fast", model, state, first, n, sampler(), batch=batch)
    np.testing.assert_array_equal(ref[0], fast[0])
    assert np.abs(ref[2] - fast[2]).max() <= 1e-4
    assert_states_close(ref[1], fast[1])


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_cpu_fast_gives_the_same_bits_in_one_thread_and_in_two(batch):
    """Splitting the rows between threads (and the products' groups of 4, 2 and 1 rows) changes
    no row's arithmetic: tokens, logits and states are bitwise those of one thread."""
    from ssmgen.generate.cpu_fast import CpuFastEngine
    model = tiny("mamba", seed=4)
    tokens, state = prompt_state(model, length=19, batch=batch)
    first = tokens[:, -1].numpy()
    n = 1024 + 37  # crosses a chunk: the next chunk's noise is drawn per group

    def gen(threads):
        logits = np.zeros((n, batch, 256), np.float32)
        eng = CpuFastEngine(model, batch, threads=threads)
        toks, final = eng.generate(state, first, n, Sampler(seed=11, batch_size=batch,
                                                            temperature=1.2),
                                   logits_out=logits)
        return toks, final, logits
    one, two = gen(1), gen(2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[2], two[2])
    assert_states_close(one[1], two[1], tol=0.0)
