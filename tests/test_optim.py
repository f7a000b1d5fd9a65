"""The optimizer: which weights Muon takes, what its update is, and that each parameter has
exactly one owner (the training tests run the cpu recipe, so they train and resume with it)."""

import copy

import torch
import torch.nn.functional as F

from ssmgen.config import load_config
from ssmgen.model import SaShiMi
from ssmgen.optim import MuonAdamW, hidden_matrices, make_optimizer


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _cfg(backend, optimizer=None):
    over = ["train.device=cpu"] + ([f"train.optimizer={optimizer}"] if optimizer else [])
    return load_config("ablated", backend=backend, overrides=over)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = _cfg("s4d")
    assert cfg.train.optimizer == "muon"  # the cpu recipe's
    torch.manual_seed(0)
    model = SaShiMi(cfg.model)
    names = _names(model, hidden_matrices(model))
    assert {"down.0.linear.weight", "up.1.linear.weight", "center.ff.0.fc1.weight",
            "center.ff.1.fc2.weight", "tiers.0.seq.1.output_linear.weight"} <= names
    assert all(n.endswith("weight") and model.get_parameter(n).ndim == 2 for n in names)
    # the token table, the head (with their ordinal maps) and the state-space parameters stay
    assert not any(n.startswith(("embedding", "head")) or ".layer." in n for n in names)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    owned = [p for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))
    assert _names(model, opt.muon.param_groups[0]["params"]) == names
    plain = make_optimizer(model, _cfg("s4d", "adamw"))
    assert isinstance(plain, torch.optim.AdamW)
    mamba = SaShiMi(_cfg("mamba").model)
    names = _names(mamba, hidden_matrices(mamba))
    assert "center.ff.1.fc1.weight" in names and "down.1.linear.weight" in names
    assert not any(".layer." in n for n in names)  # Mamba's projections stay with AdamW
    assert any(n.endswith("layer.in_proj.weight") for n, _ in mamba.named_parameters())


def test_a_muon_step_is_orthogonalized_and_resumes_from_its_state():
    """Muon's first step moves a matrix by (roughly) an orthogonal matrix: along the gradient's
    main directions the update's singular values are of one size, where the gradient's span
    orders of magnitude. Its state dict restores the next step exactly."""
    cfg = _cfg("s4d")
    torch.manual_seed(0)
    model = SaShiMi(cfg.model)
    x = torch.randint(0, 256, (2, 512))

    def loss():
        return F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))

    opt = make_optimizer(model, cfg)
    w = model.center.ff[0].fc1.weight  # 512 x 256
    before = w.detach().clone()
    opt.zero_grad()
    loss().backward()
    g = w.grad.clone()
    opt.step()
    s = torch.linalg.svdvals((w.detach() - before).double())
    sg = torch.linalg.svdvals(g.double())
    # the gradient's directions above 1% of its norm (a small batch's gradient has few)
    k = int((sg > 0.01 * sg.norm()).sum())
    assert k >= 8, k
    assert s[:k].max() / s[:k].min() < 2 < 5 < sg[:k].max() / sg[:k].min()
    saved = copy.deepcopy(opt.state_dict())  # its tensors are the live ones
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    loss().backward()
    opt.step()
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    again = make_optimizer(model, cfg)
    again.load_state_dict(saved)
    live = again.muon.param_groups + again.adamw.param_groups  # the loop sets lr through these
    assert [id(g) for g in again.param_groups] == [id(g) for g in live]
    again.zero_grad()
    loss().backward()
    again.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, after[k]), k
