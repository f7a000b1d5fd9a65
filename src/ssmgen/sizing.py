"""What a model of a config costs before it exists: a cheap bound on its parameters, its exact
size and tensor shapes from a meta-device build, the memory a parallel pass needs, and building
it only once those fit (`new_model`). Sizes are estimated before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmgen.config import AUTO_BATCH_MAX, Config, ModelConfig
from ssmgen.errors import UserError
from ssmgen.model import SaShiMi, count_parameters
from ssmgen.runtime import available_memory


def parameter_bound(cfg: ModelConfig) -> int:
    """An upper bound on the parameters of a model of `cfg`, from the config's numbers alone (any
    built-in backend; a generous allowance for plug-ins). Cheap: it decides whether the exact
    count (`footprint`) is worth building a meta model for."""
    opts = cfg.options()
    n, e = int(opts.get("d_state", 64)), int(opts.get("expand", 2))
    rank, conv = int(opts.get("rank", 1)), int(opts.get("d_conv", 4))
    widths = [cfg.d_model * cfg.expand ** i for i in range(len(cfg.pool) + 1)]
    total = 2 * cfg.n_tokens * widths[0]
    for i, w in enumerate(widths):
        per_layer = (3 + 3 * e + 2 * cfg.ff_expand + 2 * cfg.glu) * w * w \
            + w * (8 * e * n + 8 * n * (rank + 1) + e * conv + 64)
        total += cfg.n_layers * per_layer
        if i < len(cfg.pool):
            total += 2 * cfg.pool[i] * w * widths[i + 1] + 4 * widths[i + 1]
    return 2 * total  # a factor for what the formula does not count (norms, biases, plug-ins)


@dataclass
class Footprint:
    """What a model of a config holds, known before anything is allocated."""

    parameters: int
    shapes: dict[str, tuple[int, ...]]  # state_dict entries


def footprint(cfg: ModelConfig) -> Footprint:
    """Build the model on PyTorch's meta device (no memory, no arithmetic; about a second for
    PyTorch's first meta call in a process) to learn its exact size and tensor shapes."""
    with torch.device("meta"):
        model = SaShiMi(cfg)
    return Footprint(count_parameters(model),
                     {k: tuple(v.shape) for k, v in model.state_dict().items()})


def new_model(cfg: ModelConfig, *, copies: int = 2, what: str = "this model",
              fix: str = "choose a smaller model", shapes: dict[str, tuple] | None = None,
              device: torch.device | str = "cpu") -> SaShiMi:
    """A SaShiMi for `cfg`, refused in one line (before allocating) when `copies` times its
    weights would not fit in memory, or, given the `shapes` of weights to be loaded into it, when
    they differ from its own."""
    from ssmgen.runtime import available_memory, check_memory

    have = available_memory(device)
    if have is not None and 4 * copies * parameter_bound(cfg) > have / 4:  # near: count exactly
        fp = footprint(cfg)
        check_memory(4 * copies * fp.parameters, f"{what} ({fp.parameters:,} parameters)", fix,
                     device)
        if shapes is not None:
            check_shapes(fp.shapes, shapes, what)
    model = SaShiMi(cfg)
    if shapes is not None:
        check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, what)
    return model.to(device)


def check_shapes(expected: dict[str, tuple], given: dict[str, tuple], what: str) -> None:
    """UserError naming the first tensor of `given` that `expected` lacks or shapes otherwise."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        name = (missing or extra)[0]
        kind = "missing" if missing else "unexpected"
        raise UserError(f"{what}: weights do not match its config ({kind} tensor {name})")
    for k, shape in expected.items():
        if tuple(given[k]) != tuple(shape):
            raise UserError(f"{what}: weights do not match its config ({k}: {tuple(given[k])} "
                            f"where the config makes {tuple(shape)})")


def activation_bytes(cfg: ModelConfig, batch: int, length: int, *, training: bool = True) -> int:
    """A rough upper estimate of the memory a parallel pass over (batch, length) tokens needs:
    about 40 floats per channel per position per layer at each tier's rate when training (FFT
    buffers and what autograd keeps), a quarter of that without gradients."""
    per_position, rate = 0.0, 1.0
    for level in range(len(cfg.pool) + 1):
        per_position += 40 * cfg.d_model * cfg.expand ** level * cfg.n_layers * rate
        rate /= cfg.pool[level] if level < len(cfg.pool) else 1
    return int(4 * batch * length * per_position / (1 if training else 4))


def training_bytes(cfg: Config, parameters: int, batch: int) -> int:
    """Memory a training step needs: activations for `batch` crops plus weights, gradients and
    AdamW's two moments."""
    return activation_bytes(cfg.model, batch, cfg.train.sample_len) + 16 * parameters


def auto_batch(cfg: Config, parameters: int, device: torch.device, world: int) -> int:
    """The global batch for `batch_size: auto`: as many crops per process as fit in 70% of the
    device's free memory, at most AUTO_BATCH_MAX in all, a multiple of the process count."""
    have = available_memory(device) or 0
    per_crop = activation_bytes(cfg.model, 1, cfg.train.sample_len)
    fit = int((0.7 * have - 16 * parameters) // max(per_crop, 1))
    per_rank = max(1, min(fit, AUTO_BATCH_MAX // world))
    return per_rank * world
