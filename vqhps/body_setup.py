"""The body model ready to use: anny's joint regressors fitted on the project's pose library.

This module sits above both the body layer (``vqhps.body``, which reads fitted regressors from the
cache) and the data layer (``vqhps.data.poses``, the poses they are fitted on). Every entry point
(``python -m vqhps ...``, the notebooks, the demo) loads its body model through ``setup_body``.
"""
from __future__ import annotations

from .body import BodyModel, RegressorsNotFitted, load_body


def library_sampler(seed: int):
    """``sampler(n) -> (poses, ...)`` over the procedural pose library, seeded."""
    from .data.poses import PoseSampler

    return PoseSampler(seed).sample


def posed_samples(body, n: int, seed: int, batch: int = 100):
    """Posed meshes of random shapes and library poses, with their 24 and 17 joint targets (what the
    regressors are fitted on; a new seed gives held-out samples)."""
    from .body.regressors import posed_samples as _posed

    return _posed(body, n, seed, library_sampler(seed), batch)


def setup_body(cfg) -> BodyModel:
    """``vqhps.body.load_body(cfg)``, first fitting and caching anny's joint regressors when the cache
    has none (once per cache, body and fitting settings)."""
    try:
        return load_body(cfg)
    except RegressorsNotFitted as missing:
        from .body.regressors import fit_regressors

        n, seed = cfg.body.regressor_fit_samples, cfg.body.regressor_seed
        fit_regressors(missing.body, missing.cache_dir, n, seed, library_sampler(seed))
    return load_body(cfg)


__all__ = ["library_sampler", "posed_samples", "setup_body"]
