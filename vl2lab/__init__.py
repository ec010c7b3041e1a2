"""vl2lab: deploy DeepSeek-VL2 across several GPUs, one measured notebook at a time.

The top level stays light (ranks import it; transformers is loaded only when a model is):

- ``vl2lab.run(fn, world_size=N, ...)``: run a function on N ranks through torchrun (:mod:`vl2lab.launch.launcher`).
- ``vl2lab.load_pretrained(path)``: a DeepSeek-VL2 snapshot folder → ``(model, processor)``
  (:mod:`vl2lab.weights.pretrained`).
- ``vl2lab.get_config(name)``: a preset's configuration (:mod:`vl2lab.model.config`).
"""

__version__ = "0.1.0"

_LAZY = {
    "run": ("vl2lab.launch.launcher", "run"),
    "RankResults": ("vl2lab.launch.results", "RankResults"),
    "RankFailedError": ("vl2lab.launch.results", "RankFailedError"),
    "RankTimeoutError": ("vl2lab.launch.results", "RankTimeoutError"),
    "load_pretrained": ("vl2lab.weights.pretrained", "load_pretrained"),
    "save_pretrained": ("vl2lab.weights.pretrained", "save_pretrained"),
    "get_config": ("vl2lab.model.config", "get_config"),
    "build_model": ("vl2lab.model", "build_model"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vl2lab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


def load_ipython_extension(ipython):
    """``%load_ext vl2lab`` registers the ``%%torchrun`` cell magic (same as ``%load_ext vl2lab.launch.magic``)."""
    from vl2lab.launch.magic import load_ipython_extension as _load
    _load(ipython)
