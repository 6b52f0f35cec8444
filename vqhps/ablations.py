"""Table 2 of the paper: VQ-HPS ablations, each trained like the main run (notebook 03's ``vqhps``:
same data, seed, optimiser, ``cfg.vqhps`` settings) but for one change.

* ``ABLATIONS`` describes each row: run name (checkpoint stem), VQHPSConfig overrides and the
  Mesh-VQ-VAE stage whose tokens and decoder it uses. Ablations train for ``cfg.ablation.epochs``
  (1 by default: four trainings must fit one notebook), so ``REFERENCE``, the unchanged VQ-HPS
  trained with that same schedule, is the like-for-like row they are compared with;
* ``train_ablation`` trains (or resumes) one of ``RUNS`` through ``hps_training.train_vqhps``;
* ``evaluate_ablations`` gives Table 2 (PVE, MPJPE, PA-MPJPE in mm, full test split and its valid
  subset), ``hurts_most`` names the worst ablation, ``loss_comparison_figure`` is the paper's Fig. 5.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd
import torch

from . import hps_training as hps
from .metrics import METRIC_COLUMNS, centre_on_vertex_mean
from .train import TrainResult, device_of
from .vqvae_training import load_mesh_vqvae

Stage = Literal["pretrain", "finetune"]

#: notebook 03's VQ-HPS: Table 2's first row
FULL_MODEL = "vqhps"
FULL_LABEL = "VQ-HPS"


@dataclass(frozen=True)
class Ablation:
    """One row of Table 2: what differs from the full VQ-HPS."""

    #: run name: checkpoint results/<profile>/checkpoints/<name>.pt and ``python -m vqhps train --name``
    name: str
    #: the row's label, as in the paper's Table 2
    label: str
    description: str
    #: VQHPSConfig fields that differ from the main run
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: Mesh-VQ-VAE stage whose tokens (targets) and decoder (predictions) the run uses
    vqvae_stage: Stage = "finetune"


ABLATIONS: Mapping[str, Ablation] = MappingProxyType({a.name: a for a in (
    Ablation("vqhps_3d_loss", "3D loss",
             "per-vertex L2 between the ground truth and the soft-decoded mesh instead of the token cross-entropy",
             MappingProxyType({"loss": "3d"})),
    Ablation("vqhps_no_reprojection", "No reprojection",
             "rotation and camera trained by the rotation MSE alone (no 2D reprojection L1)",
             MappingProxyType({"use_reprojection": False})),
    Ablation("vqhps_pretrain_vqvae", "Mesh-VQ-VAE",
             "tokens and decoder of the Mesh-VQ-VAE pre-trained on the mesh corpus only (no fine-tuning)",
             vqvae_stage="pretrain"),
)})

#: the full VQ-HPS retrained with the ablations' schedule: what each ablation changes is measured against it
REFERENCE = Ablation("vqhps_ablation_schedule", "VQ-HPS (ablation schedule)",
                     "the full VQ-HPS, unchanged, trained with the ablations' number of epochs")
#: every run notebook 05 trains, in Table 2's row order (after notebook 03's VQ-HPS)
RUNS: Mapping[str, Ablation] = MappingProxyType({REFERENCE.name: REFERENCE, **ABLATIONS})


def ablation(name: str) -> Ablation:
    """The run called ``name`` (an ablation or the reference); ValueError listing the valid names otherwise."""
    if name not in RUNS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(RUNS)}")
    return RUNS[name]


def ablation_epochs(cfg) -> int:
    """Epochs of each ablation: ``cfg.ablation.epochs``, or the main run's ``cfg.vqhps.epochs`` when None."""
    epochs = cfg.ablation.epochs
    return int(cfg.vqhps.epochs if epochs is None else epochs)


def training_overrides(cfg, name: str) -> dict[str, Any]:
    """The VQHPSConfig overrides ``train_ablation`` passes to ``train_vqhps``: the ablation's own
    change plus its number of epochs."""
    return {**ablation(name).overrides, "epochs": ablation_epochs(cfg)}


def schedule_differences(cfg) -> dict[str, tuple[Any, Any]]:
    """{VQHPSConfig field: (main run's value, ablations' value)} for every setting but the
    ablations' own changes where notebook 03's checkpoint was trained otherwise than the ablations
    are (e.g. epochs); empty when it matches or when that checkpoint does not exist yet."""
    path = hps.vqhps_checkpoint(cfg, FULL_MODEL)
    if not path.is_file():
        return {}
    main = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("meta", {}).get("config", {})
    mine = asdict(hps.vqhps_config(cfg, epochs=ablation_epochs(cfg)))
    changed = {k for a in ABLATIONS.values() for k in a.overrides} | {"refine_epochs", "refine_lr"}
    # fields the main run's checkpoint predates are not differences it can tell
    return {k: (main[k], v) for k, v in mine.items() if k not in changed and k in main and main[k] != v}


def schedule_note(cfg) -> str:
    """One sentence: the ablations' schedule and how notebook 03's VQ-HPS was trained otherwise."""
    n = ablation_epochs(cfg)
    diffs = schedule_differences(cfg)
    head = f"Ablations and their reference train {n} epoch{'s' if n != 1 else ''} each"
    if not hps.vqhps_checkpoint(cfg, FULL_MODEL).is_file():
        return f"{head}; notebook 03's VQ-HPS checkpoint is not there yet."
    if not diffs:
        return f"{head}, exactly as notebook 03's VQ-HPS was trained (same settings)."
    parts = ", ".join(f"{k} {main} (ablations: {mine})" for k, (main, mine) in diffs.items())
    return (f"{head}; notebook 03's VQ-HPS differs in {parts}, so compare the ablations with "
            f"\"{REFERENCE.label}\", the unchanged model trained like them.")


def load_vqvaes(cfg, body, device: torch.device | str = "cpu", stages: tuple[Stage, ...] = ("finetune", "pretrain")
                ) -> dict[str, torch.nn.Module]:
    """{stage: frozen Mesh-VQ-VAE} (notebook 01 writes both checkpoints)."""
    return {stage: load_mesh_vqvae(cfg, body, stage, device) for stage in stages}


def train_ablation(cfg, body, name: str, stop_after: int | None = None, *,
                   vqvaes: Mapping[str, torch.nn.Module] | None = None, validate: bool = False,
                   **kwargs) -> tuple[torch.nn.Module, TrainResult]:
    """Train (or resume, or load when finished) the Table 2 ablation ``name`` under its own
    checkpoint name, with the main run's data, seed and optimiser (``train_vqhps``) and
    ``ablation_epochs(cfg)`` epochs. ``vqvaes`` ({stage: model}, e.g. from ``load_vqvaes``) saves
    reloading the Mesh-VQ-VAE. No per-epoch validation by default (Table 2 is measured on the test
    split; validation changes no weight); ``kwargs`` go to ``train_vqhps`` (train_arrays, ...)."""
    spec = ablation(name)
    vqvae = (vqvaes or {}).get(spec.vqvae_stage)
    if vqvae is None:
        vqvae = load_mesh_vqvae(cfg, body, spec.vqvae_stage, device_of(cfg.runtime))
    return hps.train_vqhps(cfg, body, vqvae, name=spec.name, stop_after=stop_after, vqvae_stage=spec.vqvae_stage,
                           validate=validate, **kwargs, **training_overrides(cfg, name))


def _missing(path: Path, cfg, name: str) -> FileNotFoundError:
    how = (f"run notebooks/03_vqhps_training.ipynb or `python -m vqhps train --profile {cfg.profile}`"
           if name == FULL_MODEL else f"`python -m vqhps train --profile {cfg.profile} --name {name}` "
                                      f"(or run notebooks/05_ablations.ipynb)")
    return FileNotFoundError(f"{'VQ-HPS' if name == FULL_MODEL else 'ablation'} checkpoint not found: {path}; "
                             f"train it with {how}")


def load_table2_models(cfg, body, device: torch.device | str = "cpu",
                       vqvaes: Mapping[str, torch.nn.Module] | None = None) -> dict[str, hps.ModelFn]:
    """{row label: model_fn} of Table 2 in row order: notebook 03's VQ-HPS, the reference, then each ablation, each
    with the Mesh-VQ-VAE it was trained with. FileNotFoundError naming the missing checkpoint and
    the command that writes it."""
    device = torch.device(device)
    vqvaes = dict(vqvaes) if vqvaes is not None else {}
    body = body.to(device)
    rows = [(FULL_LABEL, FULL_MODEL, "finetune")] + [(a.label, a.name, a.vqvae_stage) for a in RUNS.values()]
    models: dict[str, hps.ModelFn] = {}
    for label, name, stage in rows:
        path = hps.vqhps_checkpoint(cfg, name)
        if not path.is_file():
            raise _missing(path, cfg, name)
        if stage not in vqvaes:
            vqvaes[stage] = load_mesh_vqvae(cfg, body, stage, device)
        model = hps.load_vqhps(path, cfg, body, vqvaes[stage], device)
        models[label] = hps.vqhps_predictor(vqvaes[stage], body)(model)
    return models


def table2(summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """{row label: ``evaluate_split`` summary} -> Table 2 indexed by (method, subset) in the given
    order, subsets full and valid, columns PVE, MPJPE, PA-MPJPE (mm) (``metrics_table``'s layout)."""
    return hps.metrics_table(dict(summaries), METRIC_COLUMNS)


#: our Table 2 rows -> the paper's (the reference row has no counterpart in the paper)
PAPER_ROWS: Mapping[str, str] = MappingProxyType({FULL_LABEL: "VQ-HPS", **{a.label: a.label for a in ABLATIONS.values()}})


def with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 with the paper's number beside each metric (``paper.with_paper_columns``; the paper
    reports the full 3DPW test set only, so its valid-subset cells and the reference row are NaN)."""
    from .paper import with_paper_columns

    return with_paper_columns(table, "table2", dict(PAPER_ROWS))


def evaluate_ablations(cfg, body, device: torch.device | str | None = None, *,
                       models: Mapping[str, hps.ModelFn] | None = None, test_arrays: dict | None = None,
                       progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 2 on the test split -> (table, per_sample). ``models`` ({row label: model_fn}) default
    to ``load_table2_models`` (notebook 03's VQ-HPS and the three ablations); ``per_sample`` stacks
    ``evaluate_split``'s per-sample metrics with a ``method`` column."""
    from .data import source

    device = torch.device(device) if device is not None else device_of(cfg.runtime)
    models = models if models is not None else load_table2_models(cfg, body, device)
    test = test_arrays if test_arrays is not None else source.load_split(cfg, "test")
    per_sample, summaries = {}, {}
    for label, model_fn in models.items():
        per_sample[label], summaries[label] = hps.evaluate_split(model_fn, test, body, cfg, device, progress=progress)
    stacked = pd.concat(per_sample, names=["method", "row"]).reset_index(level="row", drop=True).reset_index()
    return table2(summaries), stacked


def hurts_most(table: pd.DataFrame, subset: str = "full") -> str:
    """One sentence from Table 2: each ablation's mean relative change of PVE, MPJPE and PA-MPJPE on
    ``subset`` against the reference row (the full model when the table has no reference), and
    which ablation hurts most."""
    rows = table.xs(subset, level="subset")[list(METRIC_COLUMNS)]
    base_label = REFERENCE.label if REFERENCE.label in rows.index else FULL_LABEL
    base = rows.loc[base_label]
    ablated = [a.label for a in ABLATIONS.values() if a.label in rows.index]
    if not ablated:
        raise ValueError(f"Table 2 has no ablation rows; expected some of {[a.label for a in ABLATIONS.values()]}")
    mean = ((rows.loc[ablated] / base - 1.0) * 100.0).mean(axis=1).sort_values(ascending=False)
    worst = mean.index[0]
    parts = ", ".join(f"{label} {mean[label]:+.1f}%" for label in mean.index)
    detail = ", ".join(f"{m} {rows.loc[worst, m]:.1f} against {base[m]:.1f} mm" for m in METRIC_COLUMNS)
    return (f"On the {subset} test split, mean relative change of PVE, MPJPE and PA-MPJPE against "
            f"\"{base_label}\": {parts}. The ablation that hurts most is \"{worst}\" ({detail}).")


# ---------------------------------------------------------------------------------------- Fig. 5
def comparison_picks(test_arrays: dict, n: int = 4) -> list[int]:
    """The fixed rule for Fig. 5: ``n`` valid test samples evenly spaced over the valid subset in
    split order (every sample counts as valid when fewer than ``n`` are), so no model chooses them."""
    valid = np.flatnonzero(np.asarray(test_arrays["valid"]).astype(bool))
    pool = valid if len(valid) >= n else np.arange(len(test_arrays["image"]))
    if len(pool) == 0:
        raise ValueError("the test split is empty: build the benchmark (notebooks/00_data.ipynb)")
    return sorted({int(pool[i]) for i in np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int)})


@torch.no_grad()
def canonical_predictions(models: Mapping[str, hps.ModelFn], test_arrays: dict, picks: list[int], body, cfg,
                          device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({label: predicted canonical meshes (n, V, 3)}, ground-truth canonical meshes (n, V, 3)) of
    the picked test samples, in metres."""
    subset = {k: np.asarray(v)[picks] for k, v in test_arrays.items()}
    batch = next(hps.iterate_split(subset, body.to(device), cfg, device, batch_size=len(picks), progress=False))
    preds = {label: fn(batch)["canonical"].float().cpu().numpy() for label, fn in models.items()}
    return preds, batch["canonical"].float().cpu().numpy()


def canonical_pve_mm(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(n, V, 3) x2 (metres) -> per-mesh mean vertex error in mm after centring both on their vertex mean."""
    p = centre_on_vertex_mean(torch.as_tensor(pred, dtype=torch.float64))
    g = centre_on_vertex_mean(torch.as_tensor(gt, dtype=torch.float64))
    return ((p - g).norm(dim=-1).mean(dim=-1) * 1000.0).numpy()


def loss_comparison_figure(images: np.ndarray, predictions: Mapping[str, np.ndarray], ground_truth: np.ndarray,
                           faces: np.ndarray, size: int = 192):
    """Fig. 5: one row per sample: the crop, each prediction's canonical mesh (front view, titled
    with its canonical PVE in mm) and the ground-truth canonical mesh."""
    from .figures import image_grid, render_meshes

    labels = list(predictions)
    errors = {label: canonical_pve_mm(predictions[label], ground_truth) for label in labels}
    tiles, titles = [], []
    for i, image in enumerate(images):
        meshes = [predictions[label][i] for label in labels] + [ground_truth[i]]
        tiles += [np.asarray(image), *render_meshes(meshes, faces, size)]
        titles += ["image", *(f"{label}: {errors[label][i]:.0f} mm" for label in labels), "ground truth"]
    return image_grid(tiles, titles, cols=len(labels) + 2, size=2.2)
