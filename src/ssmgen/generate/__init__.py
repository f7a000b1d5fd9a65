"""Generation engines: continue a model state token by token (see `engines.py`)."""

from ssmgen.generate.engines import Engine, available_engines, create_engine
from ssmgen.generate.sampling import Sampler

__all__ = ["Engine", "Sampler", "available_engines", "create_engine"]
