"""Body models behind one interface (``BodyModel``): anny (embedded default) and SMPL (user files)."""
from __future__ import annotations

from functools import lru_cache

from .base import H36M17_NAMES, SMPL24_NAMES, BodyModel, BodyOutput


def load_body(cfg) -> BodyModel:
    """The body model a config names, with its joint regressors ready (fitted once and cached)."""
    return _load_body(cfg.body.model, cfg.body.topology, cfg.body.smpl_gender, str(cfg.paths.cache),
                      str(cfg.paths.smpl_dir), cfg.body.regressor_fit_samples, cfg.body.regressor_seed)


@lru_cache(maxsize=4)
def _load_body(model: str, topology: str, gender: str, cache: str, smpl_dir: str, n_fit: int, seed: int) -> BodyModel:
    from pathlib import Path

    if model == "anny":
        from .anny_body import AnnyBody
        from .regressors import load_or_fit_regressors

        body = AnnyBody(Path(cache) / "anny", topology=topology)
        reg = load_or_fit_regressors(body, Path(cache) / "regressors", n_samples=n_fit, seed=seed)
        body.set_regressors(reg["regressor24"], reg["regressor17"])
        return body.eval()
    if model == "smpl":
        from .smpl import SMPLBody

        return SMPLBody(Path(smpl_dir), gender=gender).eval()
    raise ValueError(f"unknown body model {model!r} (config field body.model): use 'anny' or 'smpl'")


__all__ = ["BodyModel", "BodyOutput", "SMPL24_NAMES", "H36M17_NAMES", "load_body"]
