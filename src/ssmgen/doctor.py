"""`ssmgen doctor`: what this installation can do, as plain data."""

from __future__ import annotations

import importlib.util
import os
import platform


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "installed"))
    except Exception as e:  # an extra that is present but broken is worth reporting, not raising
        return f"broken ({type(e).__name__}: {e})"


def report() -> dict[str, str]:
    """Versions, device, backends, generation engines and optional extras, as name -> text."""
    import numpy
    import soundfile
    import torch

    from ssmgen import __version__, backends

    rows = {
        "ssmgen": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "soundfile": f"{soundfile.__version__} (libsndfile {soundfile.__libsndfile_version__})",
        "soxr": _version("soxr"),
        "numba": _version("numba"),
    }
    if torch.cuda.is_available():
        rows["device"] = f"cuda ({torch.cuda.get_device_name(0)}), cpu"
    else:
        rows["device"] = "cpu (no CUDA device)"
    rows["backends"] = ", ".join(backends.available())
    try:
        from ssmgen.generate.engines import available_engines
        rows["engines"] = ", ".join(available_engines())
    except ImportError:
        rows["engines"] = "torch"
    from ssmgen.workspace import BUNDLED_DEFAULT, bundled_models
    models = bundled_models()
    rows["bundled models"] = ", ".join(
        f"{name} ({path.stat().st_size / 1e6:.1f} MB"
        f"{', the default' if name == BUNDLED_DEFAULT else ''})"
        for name, path in sorted(models.items())) or "none"
    rows["onnx extra"] = f"onnx {_version('onnx')}, onnxruntime {_version('onnxruntime')}"
    rows["cuda extra"] = (f"mamba_ssm {_version('mamba_ssm')}, "
                          f"causal_conv1d {_version('causal_conv1d')}")
    return rows
