"""ssmgen-lru: the Linear Recurrent Unit (Orvieto et al. 2023) as an ssmgen sequence backend.

Installed, it registers under the name ``lru`` in the ``ssmgen.backends`` entry-point group, so
``ssmgen train DATA --backend lru`` uses it. See README.md.
"""

from ssmgen_lru.lru import LRU, lru_reference

__all__ = ["LRU", "lru_reference"]
__version__ = "0.1.0"
