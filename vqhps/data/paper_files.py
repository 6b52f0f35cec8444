"""The paper's data files (SMPL, AMASS, 3DPW): present and readable before a ``data.source="paper"`` run
writes anything. Every problem is reported at once, each with its file, the environment variable that
locates it and how to obtain it, so one run of the check tells the user everything to fix.

The check only reads: folder listings, pickles of the SMPL model and 3DPW sequences (validated by
their readers), the regressor, and the zip directory and array headers of each AMASS ``.npz`` (not
its arrays: thousands of files stay within seconds). torch is imported only when a pickle exists,
so a check with files missing answers in well under a second.
"""
from __future__ import annotations

import ast
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vqhps.config import PATH_ENV_VARS

SMPL_ENV, AMASS_ENV, PW3D_ENV = "VQHPS_SMPL_DIR", "VQHPS_AMASS_DIR", "VQHPS_3DPW_DIR"
#: file names of vqhps.body.smpl (GENDER_FILES, H36M_REGRESSOR_FILE), repeated to avoid importing torch
SMPL_FILES = {"neutral": "SMPL_NEUTRAL.pkl", "male": "SMPL_MALE.pkl", "female": "SMPL_FEMALE.pkl"}
REGRESSOR_FILE = "J_regressor_h36m.npy"
SMPL_VERTICES, H36M_JOINTS = 6890, 17
PW3D_SPLITS = ("train", "validation", "test")
#: fields and pose widths (SMPL, SMPL+H, SMPL-X) that vqhps.data.amass.load_amass_npz reads
AMASS_FIELDS = ("poses", "trans", "betas")
AMASS_FPS_FIELDS = ("mocap_framerate", "mocap_frame_rate")
AMASS_POSE_WIDTHS = (72, 156, 165)

SMPL_LAYOUT = (f"$VQHPS_SMPL_DIR/SMPL_NEUTRAL.pkl (official SMPL layout) and $VQHPS_SMPL_DIR/{REGRESSOR_FILE} "
               f"({H36M_JOINTS} x {SMPL_VERTICES}, finite, non-negative)")
SMPL_OBTAIN = ("register at https://smpl.is.tue.mpg.de, download 'SMPL for Python' (v1.1.0) and copy "
               "basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl there as SMPL_NEUTRAL.pkl")
REGRESSOR_OBTAIN = (f"{REGRESSOR_FILE} ships in SPIN's data.tar.gz (github.com/nkolot/SPIN, fetch_data.sh) "
                    "and VIBE's vibe_data.zip (github.com/mkocabas/VIBE, scripts/prepare_data.sh)")
AMASS_LAYOUT = ("$VQHPS_AMASS_DIR/**/*.npz, AMASS motion files with poses (T, 156), trans (T, 3), betas "
                "and mocap_framerate (per-subject shape.npz ignored)")
AMASS_OBTAIN = ("register at https://amass.is.tue.mpg.de, download the 'SMPL+H G' body data of each subset "
                "and extract it under $VQHPS_AMASS_DIR")
PW3D_LAYOUT = ("$VQHPS_3DPW_DIR/sequenceFiles/{train,validation,test}/*.pkl and "
               "$VQHPS_3DPW_DIR/imageFiles/<sequence>/image_%05d.jpg for every frame")
PW3D_OBTAIN = ("download sequenceFiles.zip and imageFiles.zip from https://virtualhumans.mpi-inf.mpg.de/3DPW/ "
               "and extract both into $VQHPS_3DPW_DIR")


@dataclass(frozen=True)
class Problem:
    """One missing or malformed file of the paper's data and what the user should do about it."""

    file: Path
    env_var: str
    what: str
    expected: str
    obtain: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


@dataclass
class PaperFilesReport:
    """Outcome of one check: the problems, and counts of what was found (for the success message)."""

    problems: list[Problem] = field(default_factory=list)
    amass_files: int = 0
    pw3d_sequences: int = 0
    pw3d_frames: int = 0


class PaperFilesError(FileNotFoundError):
    """The paper's data is incomplete; ``problems`` lists every missing or malformed file."""

    def __init__(self, problems: list[Problem], cfg: Any) -> None:
        super().__init__(format_problems(problems, cfg))
        self.problems = problems


def _folder_note(env_var: str, cfg: Any) -> str:
    """``VQHPS_X=/path`` when set, else the default folder the config falls back to."""
    folder = getattr(cfg.paths, PATH_ENV_VARS[env_var])
    return f"{env_var}={folder}" if os.environ.get(env_var) else f"{env_var} is not set (default: {folder})"


def format_problems(problems: list[Problem], cfg: Any) -> str:
    """Every problem, grouped by environment variable and source, each group with its fix."""
    lines = [f"the paper's data (data.source=paper) has {len(problems)} problem(s); nothing was written"]
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        groups.setdefault(p.env_var, []).append(p)
    for env_var, members in groups.items():
        lines.append(_folder_note(env_var, cfg))
        lines += [f"  expected: {e}" for e in dict.fromkeys(p.expected for p in members)]
        lines += [f"  fix: {o}" for o in dict.fromkeys(p.obtain for p in members)]
        lines += [f"  - {p}" for p in members]
    return "\n".join(lines)


def _what(err: Exception, path: Path) -> str:
    """A reader's error message without its leading ``<path>: `` (the problem names the file)."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


# ----------------------------------------------------------------------------------------------- SMPL
def _check_smpl(smpl_dir: Path, genders: Iterable[str]) -> list[Problem]:
    """The SMPL model file(s), then the H36M regressor against the model's vertex count."""
    problems: list[Problem] = []
    n_verts = SMPL_VERTICES
    for gender in dict.fromkeys(genders):
        path = smpl_dir / SMPL_FILES[gender]
        if not path.is_file():
            problems.append(Problem(path, SMPL_ENV, "missing", SMPL_LAYOUT, SMPL_OBTAIN))
            continue
        from vqhps.body.smpl import load_smpl_arrays  # imports torch: only when there is a file to read

        try:
            arrays = load_smpl_arrays(path)
        except (ValueError, OSError) as err:
            problems.append(Problem(path, SMPL_ENV, _what(err, path), SMPL_LAYOUT, SMPL_OBTAIN))
            continue
        if gender == "neutral":
            n_verts = arrays.v_template.shape[0]
    path = smpl_dir / REGRESSOR_FILE
    what = _regressor_problem(path, n_verts) if path.is_file() else "missing"
    if what:
        problems.append(Problem(path, SMPL_ENV, what, SMPL_LAYOUT, REGRESSOR_OBTAIN))
    return problems


def _regressor_problem(path: Path, n_verts: int) -> str | None:
    """What is wrong with a (17, V) H36M joint regressor file, or None."""
    try:
        reg = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - every failure means "not a readable .npy"
        return f"not a readable .npy array ({type(exc).__name__}: {exc})"
    wrong = []
    if reg.shape != (H36M_JOINTS, n_verts):
        wrong.append(f"shape {reg.shape}, expected ({H36M_JOINTS}, {n_verts})")
    if not np.issubdtype(reg.dtype, np.number):
        return "; ".join([*wrong, f"dtype {reg.dtype}, expected numbers"])
    finite = np.isfinite(reg)
    if not finite.all():
        wrong.append(f"{int((~finite).sum())} non-finite entries")
    negative = int((reg[finite] < 0).sum())
    if negative:
        wrong.append(f"{negative} negative entries (min {reg[finite].min():.3g}); joint weights must be >= 0")
    return "; ".join(wrong) or None


# ---------------------------------------------------------------------------------------------- AMASS
def amass_motion_files(root: Path) -> list[Path]:
    """Motion ``.npz`` files under ``root``, sorted, without AMASS's per-subject ``shape.npz``
    (as vqhps.data.amass.find_amass_files, without its torch import)."""
    return sorted(p for p in root.rglob("*.npz") if p.name != "shape.npz")


def _npy_shape(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of one ``.npy`` member (its data is not read)."""
    with zf.open(member) as fh:
        major, _ = np.lib.format.read_magic(fh)
        size = int.from_bytes(fh.read(2 if major == 1 else 4), "little")
        header = ast.literal_eval(fh.read(size).decode("latin1" if major < 3 else "utf8"))
    return tuple(header["shape"]), np.dtype(header["descr"])


def _amass_problem(path: Path) -> str | None:
    """What is wrong with one AMASS motion file, judged from its zip directory and array headers."""
    try:
        with zipfile.ZipFile(path) as zf:
            fields = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in AMASS_FIELDS if k not in fields]
            if not fields & set(AMASS_FPS_FIELDS):
                missing.append(AMASS_FPS_FIELDS[0])
            if missing:
                return f"missing field(s) {', '.join(missing)} (has {', '.join(sorted(fields)) or 'none'})"
            poses, poses_dtype = _npy_shape(zf, "poses.npy")
            trans, _ = _npy_shape(zf, "trans.npy")
    except (zipfile.BadZipFile, OSError, ValueError, SyntaxError, KeyError, EOFError) as exc:
        return f"not a readable .npz archive ({type(exc).__name__}: {exc})"
    if len(poses) != 2 or poses[0] == 0 or poses[1] not in AMASS_POSE_WIDTHS or poses_dtype.kind not in "fiu":
        return f"field 'poses' has shape {poses} ({poses_dtype}), expected (T>0, one of {list(AMASS_POSE_WIDTHS)})"
    if trans != (poses[0], 3):
        return f"field 'trans' has shape {trans}, expected ({poses[0]}, 3)"
    return None


def _check_amass(root: Path, report: PaperFilesReport) -> list[Problem]:
    def problem(file: Path, what: str) -> Problem:
        return Problem(file, AMASS_ENV, what, AMASS_LAYOUT, AMASS_OBTAIN)

    if not root.is_dir():
        return [problem(root, "folder not found")]
    files = amass_motion_files(root)
    report.amass_files = len(files)
    if not files:
        return [problem(root, "no motion .npz file under it")]
    return [problem(f, what) for f in files if (what := _amass_problem(f))]


# ----------------------------------------------------------------------------------------------- 3DPW
def _check_pw3d(root: Path, report: PaperFilesReport) -> list[Problem]:
    """Each split folder non-empty, each sequence pickle valid, every frame's image present (one
    problem per sequence: its first missing frame and how many are missing)."""
    def problem(file: Path, what: str) -> Problem:
        return Problem(file, PW3D_ENV, what, PW3D_LAYOUT, PW3D_OBTAIN)

    problems: list[Problem] = []
    pickles: list[Path] = []
    for split in PW3D_SPLITS:
        folder = root / "sequenceFiles" / split
        if not folder.is_dir():
            problems.append(problem(folder, "folder not found"))
            continue
        found = sorted(folder.glob("*.pkl"))
        if not found:
            problems.append(problem(folder, f"no sequence .pkl file (the {split} split is empty)"))
        pickles += found
    image_root = root / "imageFiles"
    if not image_root.is_dir():
        problems.append(problem(image_root, "folder not found"))
    if not pickles:
        return problems
    from vqhps.data.pw3d import load_pw3d_sequence  # imports torch: only when there is a pickle to read

    for pkl in pickles:
        try:
            seq = load_pw3d_sequence(pkl)
        except (ValueError, OSError) as err:
            problems.append(problem(pkl, _what(err, pkl)))
            continue
        report.pw3d_sequences += 1
        report.pw3d_frames += seq.n_frames
        if not image_root.is_dir():
            continue
        folder = image_root / seq.sequence
        if not folder.is_dir():
            problems.append(problem(folder, f"image folder of {pkl.name} not found ({seq.n_frames} frames expected)"))
            continue
        present = set(os.listdir(folder))
        missing = [seq.image_path(image_root, t) for t in range(seq.n_frames)
                   if f"image_{int(seq.img_frame_ids[t]):05d}.jpg" not in present]
        if missing:
            problems.append(problem(missing[0], f"missing; {len(missing)} of {seq.n_frames} frames of "
                                                f"{pkl.name} have no image (this is the first)"))
    return problems


# ---------------------------------------------------------------------------------------------- entry
def inspect_paper_files(cfg: Any) -> PaperFilesReport:
    """Check every file a ``data.source="paper"`` run reads; the problems and what was found."""
    report = PaperFilesReport()
    report.problems += _check_smpl(cfg.paths.smpl_dir, ("neutral", cfg.body.smpl_gender))
    report.problems += _check_amass(cfg.paths.amass_dir, report)
    report.problems += _check_pw3d(cfg.paths.pw3d_dir, report)
    return report


def check_paper_files(cfg: Any) -> list[Problem]:
    """Every missing or malformed file of the paper's data (empty: all present)."""
    return inspect_paper_files(cfg).problems


def require_paper_files(cfg: Any) -> PaperFilesReport:
    """Raise PaperFilesError listing every problem at once; return what was found when there is none."""
    report = inspect_paper_files(cfg)
    if report.problems:
        raise PaperFilesError(report.problems, cfg)
    return report


def summary_line(cfg: Any, report: PaperFilesReport) -> str:
    """One line for a passed check: what was found, and where."""
    return (f"all paper files present: SMPL in {cfg.paths.smpl_dir}; {report.amass_files:,} AMASS motion files "
            f"in {cfg.paths.amass_dir}; {report.pw3d_sequences} 3DPW sequences ({report.pw3d_frames:,} frames) "
            f"in {cfg.paths.pw3d_dir}")
