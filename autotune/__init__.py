"""Per-GPU kernel configurations: searched, verified against the reference, timed, and cached.

``python -m sparkinfer_cute.autotune MODEL.gguf`` searches the launch configurations of the kernels a model uses on
this GPU (see ``autotune/__main__.py``); the engine reads the result through :func:`load_tuned` (``lookup.py``).
Importing this package is cheap: no kernel module, no cutlass.
"""

from .cache import DeviceIdentity, TuneCache, cache_path
from .lookup import TunedConfigs, autotune_enabled, describe_sites, describe_tuning, load_tuned
from .registry import TunableOp, TuneContext

__all__ = [
    "DeviceIdentity",
    "TunableOp",
    "TuneCache",
    "TuneContext",
    "TunedConfigs",
    "autotune_enabled",
    "cache_path",
    "describe_sites",
    "describe_tuning",
    "load_tuned",
]
