"""The paper's data check (vqhps.data.paper_files): a run on ``data.source=paper`` without the files
stops at once, names every missing file with its environment variable and writes nothing; a complete
tree passes; every kind of malformed file is reported, all in one run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_smpl import rewrite_pickle, write_amass_npz, write_pw3d, write_smpl_pkl
from vqhps.cli import _DATA_COMMANDS, main
from vqhps.config import load_config
from vqhps.data import paper_files
from vqhps.data.paper_files import PaperFilesError, check_paper_files

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
#: every path a run may write (results, data, cache) and every path the check reads
WRITE_VARS = ("VQHPS_RESULTS_DIR", "VQHPS_DATA_DIR", "VQHPS_CACHE_DIR")
FILE_VARS = ("VQHPS_SMPL_DIR", "VQHPS_AMASS_DIR", "VQHPS_3DPW_DIR")
SEQUENCES = {"train": "courtyard_fake_00", "validation": "outdoors_fake_01", "test": "downtown_fake_02"}


def _env(tmp_path: Path) -> dict[str, str]:
    """Write folders and the paper's folders, all under ``tmp_path`` (the paper's ones empty)."""
    env = {var: str(tmp_path / var.lower()) for var in (*WRITE_VARS, *FILE_VARS)}
    return {**env, "VQHPS_SET": "", "VQHPS_ROOT": str(ROOT)}


def _snapshot(env: dict[str, str]) -> dict[str, list[str] | None]:
    """Every file and folder under the write folders (None: the folder does not exist)."""
    return {var: sorted(str(p) for p in Path(env[var]).rglob("*")) if Path(env[var]).exists() else None
            for var in WRITE_VARS}


def _run(cmd: list[str], env: dict[str, str], limit_s: float = 10.0) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` from the repository root; its whole process group is killed past ``limit_s``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {limit_s:.0f} s: the files were not checked first")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - start


def _assert_names_every_missing_file(output: str, env: dict[str, str]) -> None:
    smpl, amass, pw3d = (Path(env[v]) for v in FILE_VARS)
    expected = [smpl / "SMPL_NEUTRAL.pkl", smpl / "J_regressor_h36m.npy", amass,
                *(pw3d / "sequenceFiles" / s for s in ("train", "validation", "test")), pw3d / "imageFiles"]
    for path in expected:
        assert f"- {path}:" in output, f"{path} not reported:\n{output}"
    for var in FILE_VARS:
        assert f"{var}={env[var]}" in output, f"{var} not named:\n{output}"
    for url in ("https://smpl.is.tue.mpg.de", "https://amass.is.tue.mpg.de", "https://virtualhumans.mpi-inf.mpg.de"):
        assert url in output


# ------------------------------------------------------------------------------- without the files
def test_reproduce_cli_without_paper_files_fails_fast_and_writes_nothing(tmp_path):
    env = _env(tmp_path)
    before = _snapshot(env)
    result, wall = _run([str(PYTHON), "-m", "vqhps", "reproduce", "--profile", "smoke", "--set", "data.source=paper"],
                        env)
    assert result.returncode == 2, result.stderr
    assert wall < 10.0
    _assert_names_every_missing_file(result.stderr, env)
    assert _snapshot(env) == before


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_reproduce_source_paper_without_files_fails_fast_and_writes_nothing(tmp_path):
    """The exact ``make reproduce SOURCE=paper PROFILE=smoke``, with two additions: VENV names the
    environment running the tests, and ``-o <stamp>`` keeps make from re-installing packages into it
    (its stamp's recipe is pip; a stamp older than requirements.txt would otherwise trigger it). The
    rest of ``make setup`` (setup-body) and of ``make reproduce`` runs as written."""
    env = _env(tmp_path)
    venv = PYTHON.parent.parent
    before = _snapshot(env)
    result, wall = _run(["make", "--no-print-directory", "-o", f"{venv}/.vqhps-setup", f"VENV={venv}", "reproduce",
                         "SOURCE=paper", "PROFILE=smoke"], env)
    assert result.returncode != 0, result.stdout
    assert wall < 10.0
    _assert_names_every_missing_file(result.stderr, env)
    assert _snapshot(env) == before


@pytest.mark.parametrize("command", [*_DATA_COMMANDS, "check-data"])
def test_every_data_command_checks_the_files_first(command, tmp_path, monkeypatch, capsys):
    env = _env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _snapshot(env)
    assert main([command, "--set", "data.source=paper"]) == 2
    _assert_names_every_missing_file(capsys.readouterr().err, env)
    assert _snapshot(env) == before


def test_library_reproduce_checks_the_files_first(tmp_path, monkeypatch):
    from vqhps.reproduce import reproduce

    env = _env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _snapshot(env)
    with pytest.raises(PaperFilesError) as err:
        reproduce("smoke", overrides=["data.source=paper"])
    assert len(err.value.problems) == 7
    assert _snapshot(env) == before


def test_synthetic_runs_skip_the_check(tmp_path, monkeypatch):
    """Without data.source=paper no data command looks for the paper's files."""
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    from vqhps.cli import _require_paper_files, build_parser

    _require_paper_files(build_parser().parse_args(["prepare"]))  # would raise if it checked


# ------------------------------------------------------------------------------- with the files
def _regressor(n_verts: int = 6890) -> np.ndarray:
    reg = np.zeros((17, n_verts))
    reg[np.arange(17), np.arange(17) * 7] = 1.0
    return reg


@pytest.fixture
def paper_tree(tmp_path, monkeypatch):
    """A complete, format-true paper tree (small): SMPL + regressor, two AMASS motions (and a
    shape.npz, which is ignored), one 3DPW sequence per split with its frames; env vars point at it."""
    env = _env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    smpl, amass, pw3d = (Path(env[v]) for v in FILE_VARS)
    write_smpl_pkl(smpl)
    np.save(smpl / "J_regressor_h36m.npy", _regressor())
    write_amass_npz(amass / "CMU" / "01" / "01_01_poses.npz")
    write_amass_npz(amass / "BMLmovi" / "Subject_1" / "walk_poses.npz", width=72, seed=1)
    np.savez(amass / "CMU" / "01" / "shape.npz", betas=np.zeros(16), gender=np.array("male"))
    for split, sequence in SEQUENCES.items():
        pkl, _, _ = write_pw3d(pw3d, sequence=sequence, n_frames=4)
        if split != "test":
            (pw3d / "sequenceFiles" / split).mkdir(parents=True, exist_ok=True)
            pkl.rename(pw3d / "sequenceFiles" / split / pkl.name)
    return {"smpl": smpl, "amass": amass, "pw3d": pw3d, "env": env}


def test_complete_tree_passes(paper_tree, capsys):
    cfg = load_config("smoke", **{"data.source": "paper"})
    assert check_paper_files(cfg) == []
    assert main(["check-data", "--set", "data.source=paper"]) == 0
    out = capsys.readouterr().out
    assert "all paper files present" in out
    assert "2 AMASS motion files" in out and "3 3DPW sequences (12 frames)" in out


def test_every_malformation_is_reported_with_its_file_in_one_run(paper_tree):
    smpl, amass, pw3d = paper_tree["smpl"], paper_tree["amass"], paper_tree["pw3d"]
    seq_dir, img_dir = pw3d / "sequenceFiles", pw3d / "imageFiles"
    # a 3DPW pickle without cam_poses
    train_pkl = seq_dir / "train" / f"{SEQUENCES['train']}.pkl"
    rewrite_pickle(train_pkl, train_pkl, cam_poses=None)
    # two frames of the test sequence missing (image numbers 2t: 2 and 6)
    for frame in (2, 6):
        (img_dir / SEQUENCES["test"] / f"image_{frame:05d}.jpg").unlink()
    # an empty split
    (seq_dir / "validation" / f"{SEQUENCES['validation']}.pkl").unlink()
    # a regressor with a negative entry
    reg = _regressor()
    reg[3, 100] = -0.25
    np.save(smpl / "J_regressor_h36m.npy", reg)
    # an AMASS file without poses, and one that is not a zip archive
    no_poses = write_amass_npz(amass / "CMU" / "02" / "02_01_poses.npz", drop=("poses",))
    not_zip = amass / "CMU" / "02" / "02_02_poses.npz"
    not_zip.write_bytes(b"not an archive")

    problems = check_paper_files(load_config("smoke", **{"data.source": "paper"}))
    by_file = {p.file: p for p in problems}
    assert set(by_file) == {
        train_pkl, img_dir / SEQUENCES["test"] / "image_00002.jpg", seq_dir / "validation",
        smpl / "J_regressor_h36m.npy", no_poses, not_zip,
    }, "\n".join(map(str, problems))
    assert "cam_poses" in by_file[train_pkl].what
    assert "2 of 4 frames" in by_file[img_dir / SEQUENCES["test"] / "image_00002.jpg"].what
    assert "empty" in by_file[seq_dir / "validation"].what
    assert "1 negative" in by_file[smpl / "J_regressor_h36m.npy"].what
    assert "poses" in by_file[no_poses].what and "not a readable .npz" in by_file[not_zip].what
    envs = {p.file: p.env_var for p in problems}
    assert envs[train_pkl] == envs[seq_dir / "validation"] == "VQHPS_3DPW_DIR"
    assert envs[no_poses] == "VQHPS_AMASS_DIR" and envs[smpl / "J_regressor_h36m.npy"] == "VQHPS_SMPL_DIR"


@pytest.mark.parametrize("bad, words", [
    (_regressor(6000), "shape (17, 6000), expected (17, 6890)"),
    (np.where(_regressor() > 0, np.nan, 0.0), "17 non-finite"),
    (_regressor()[:16], "shape (16, 6890)"),
])
def test_malformed_regressor_is_reported(paper_tree, bad, words):
    np.save(paper_tree["smpl"] / "J_regressor_h36m.npy", bad)
    (problem,) = check_paper_files(load_config("smoke", **{"data.source": "paper"}))
    assert problem.file == paper_tree["smpl"] / "J_regressor_h36m.npy" and words in problem.what


def test_malformed_smpl_model_and_missing_image_folder_are_reported(paper_tree):
    (paper_tree["smpl"] / "SMPL_NEUTRAL.pkl").write_bytes(b"\x80\x02garbage")
    shutil.rmtree(paper_tree["pw3d"] / "imageFiles" / SEQUENCES["validation"])
    problems = check_paper_files(load_config("smoke", **{"data.source": "paper"}))
    assert {p.file for p in problems} == {paper_tree["smpl"] / "SMPL_NEUTRAL.pkl",
                                          paper_tree["pw3d"] / "imageFiles" / SEQUENCES["validation"]}


def test_amass_poses_with_a_wrong_width_is_reported(paper_tree):
    bad = write_amass_npz(paper_tree["amass"] / "CMU" / "03" / "03_01_poses.npz", width=60)
    (problem,) = check_paper_files(load_config("smoke", **{"data.source": "paper"}))
    assert problem.file == bad and "field 'poses' has shape (12, 60)" in problem.what


def test_constants_match_the_readers(paper_tree):
    """paper_files repeats a few names to avoid importing torch: they must equal the readers'."""
    from vqhps.body.smpl import GENDER_FILES, H36M_REGRESSOR_FILE
    from vqhps.data.amass import FPS_KEYS, POSE_WIDTHS, find_amass_files

    assert paper_files.SMPL_FILES == GENDER_FILES and paper_files.REGRESSOR_FILE == H36M_REGRESSOR_FILE
    assert set(paper_files.AMASS_POSE_WIDTHS) == set(POSE_WIDTHS) and paper_files.AMASS_FPS_FIELDS == FPS_KEYS
    assert paper_files.amass_motion_files(paper_tree["amass"]) == find_amass_files(paper_tree["amass"])
