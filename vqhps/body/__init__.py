"""Body models behind one interface (``BodyModel``): anny (embedded default) and SMPL (user files).

anny's joint regressors are fitted once on posed samples and cached; the fitting needs a pose source,
which lives in the data layer, so it runs above both: ``vqhps.body_setup.setup_body`` (also
``python -m vqhps setup-body``). ``load_body`` here reads the cache.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .base import H36M17_NAMES, SMPL24_NAMES, BodyModel, BodyOutput


class RegressorsNotFitted(FileNotFoundError):
    """anny's joint regressors are not in the cache yet. ``body`` is the model without them and
    ``cache_dir`` where ``vqhps.body.regressors.fit_regressors`` should write them."""

    def __init__(self, body, cache_dir: Path, path: Path):
        super().__init__(f"joint regressors for {body.identifier()} not fitted yet (expected {path}); "
                         f"run `python -m vqhps setup-body`, or load the body with "
                         f"vqhps.body_setup.setup_body(cfg), which fits them once")
        self.body, self.cache_dir, self.path = body, cache_dir, path


def load_body(cfg) -> BodyModel:
    """The body model a config names, with its joint regressors from the cache (anny: fitted by
    ``vqhps.body_setup.setup_body``; RegressorsNotFitted when they are not there yet)."""
    return _load_body(cfg.body.model, cfg.body.topology, cfg.body.smpl_gender, str(cfg.paths.cache),
                      str(cfg.paths.smpl_dir), cfg.body.regressor_fit_samples, cfg.body.regressor_seed,
                      cfg.data.source == "paper")


@lru_cache(maxsize=4)
def _load_body(model: str, topology: str, gender: str, cache: str, smpl_dir: str, n_fit: int, seed: int,
               require_h36m: bool = False) -> BodyModel:
    if model == "anny":
        from .anny_body import AnnyBody
        from .regressors import load_regressors, regressor_path

        body = AnnyBody(Path(cache) / "anny", topology=topology)
        cache_dir = Path(cache) / "regressors"
        reg = load_regressors(body, cache_dir, n_samples=n_fit, seed=seed)
        if reg is None:
            raise RegressorsNotFitted(body, cache_dir, regressor_path(body, cache_dir, n_fit, seed))
        body.set_regressors(reg["regressor24"], reg["regressor17"])
        return body.eval()
    if model == "smpl":
        from .smpl import SMPLBody

        # the paper's protocol measures joints through the user's H36M regressor: no fallback then
        return SMPLBody(Path(smpl_dir), gender=gender, require_h36m=require_h36m).eval()
    raise ValueError(f"unknown body model {model!r} (config field body.model): use 'anny' or 'smpl'")


__all__ = ["BodyModel", "BodyOutput", "SMPL24_NAMES", "H36M17_NAMES", "RegressorsNotFitted", "load_body"]
