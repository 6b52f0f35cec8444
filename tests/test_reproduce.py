"""``reproduce --overlap``: background trainings start when their inputs exist and notebooks wait for them."""
import time

import pytest

from vqhps.reproduce import BackgroundJob, JobRunner, overlap_jobs, threads_per_process


def _runner(tmp_path, jobs, scripts):
    runner = JobRunner(jobs, "smoke", tmp_path / "logs", threads=1)
    runner._script = lambda job: scripts[job.name]  # stand-ins for `python -m vqhps ...`
    return runner


def test_jobs_start_after_their_inputs_and_notebooks_wait_for_them(tmp_path):
    trace = tmp_path / "trace"
    jobs = (BackgroundJob("a", (), after=(), needed_by="01"),
            BackgroundJob("b", (), after=("00", "a"), needed_by="02"))
    runner = _runner(tmp_path, jobs, {"a": f"sleep 0.5; echo a >> {trace}", "b": f"echo b >> {trace}"})
    runner.wait_for("00_data.ipynb")  # needs nothing: starts a, returns at once
    assert set(runner.procs) == {"a"} and "a" not in runner.done
    runner.done.add("00")
    start = time.perf_counter()
    runner.wait_for("01_mesh_vqvae.ipynb")  # blocks until a is done, which makes b ready
    assert time.perf_counter() - start >= 0.3
    assert "a" in runner.done and "b" in runner.procs
    runner.wait_for("02_reconstruction.ipynb")
    assert trace.read_text().split() == ["a", "b"]
    assert runner.walls["a"]["status"] == "ok" and runner.walls["a"]["wall_s"] >= 0.4
    assert (tmp_path / "logs" / "b.log").exists()


def test_a_failed_job_stops_the_run_and_names_its_log(tmp_path):
    runner = _runner(tmp_path, (BackgroundJob("bad", (), after=(), needed_by="01"),),
                     {"bad": "echo broken; exit 3"})
    with pytest.raises(RuntimeError, match=r"'bad' failed \(exit 3\).*bad\.log"):
        runner.wait_for("01_mesh_vqvae.ipynb")
    assert "broken" in (tmp_path / "logs" / "bad.log").read_text()


def test_a_job_whose_inputs_never_come_is_reported(tmp_path):
    runner = _runner(tmp_path, (BackgroundJob("late", (), after=("00",), needed_by="01"),), {"late": "true"})
    with pytest.raises(RuntimeError, match="cannot start"):
        runner.wait_for("01_mesh_vqvae.ipynb")


def test_the_study_schedule_trains_every_model_before_the_notebook_that_evaluates_it():
    from vqhps.ablations import RUNS
    from vqhps.baseline_training import BASELINES

    jobs = {j.name: j for j in overlap_jobs()}
    trained = {c[c.index("--name") + 1] for j in jobs.values() for c in j.commands if "--name" in c}
    assert trained == {"vqhps", *BASELINES, *RUNS}
    assert jobs["mesh_vqvae"].after == () and jobs["mesh_vqvae"].needed_by == "01"
    for name in ("vqhps", "ablations"):  # token targets come from the Mesh-VQ-VAE, images from notebook 00
        assert {"00", "mesh_vqvae"} <= set(jobs[name].after)
    assert jobs["vqhps"].needed_by == "03"
    for name in BASELINES:  # one job each, so the three train side by side once the images exist
        assert jobs[name].after == ("00",) and jobs[name].needed_by == "04"
    assert jobs["ablations"].needed_by == "05"


def test_stop_ends_a_running_job_and_the_processes_it_started(tmp_path):
    marker = tmp_path / "survived"
    runner = _runner(tmp_path, (BackgroundJob("long", (), after=(), needed_by="01"),),
                     {"long": f"sh -c 'sleep 5; touch {marker}' && true"})  # a training the job's shell started
    runner.start_ready()
    _, proc, _ = runner.procs["long"]
    time.sleep(0.3)
    runner.stop()
    assert proc.poll() is not None
    time.sleep(5.5)
    assert not marker.exists()


def test_environment_facts_name_the_commit(monkeypatch):
    import subprocess

    from vqhps.config import PROJECT_ROOT
    from vqhps.reproduce import environment_facts

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("VQHPS_GIT_COMMIT", raising=False)
    assert environment_facts()["git_commit"] == (head or "unknown")
    monkeypatch.setenv("VQHPS_GIT_COMMIT", "abc1234")  # a copied tree whose git metadata is stale
    assert environment_facts()["git_commit"] == "abc1234"


def test_timeline_shows_every_notebook_and_job_that_records_its_start(tmp_path):
    from PIL import Image

    from vqhps.figures import save_figure, timeline_figure

    manifest = {"profile": "full", "elapsed_s": 1840.0,
                "notebooks": {"00_data.ipynb": {"wall_s": 264.0, "start_s": 0.0},
                              "01_mesh_vqvae.ipynb": {"wall_s": 43.0, "start_s": 662.0},
                              "02_reconstruction.ipynb": {"wall_s": 31.0}},  # an older entry: no start
                "background_jobs": {"mesh_vqvae": {"wall_s": 660.0, "start_s": 0.5}}}
    fig = timeline_figure(manifest)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["00_data", "job: mesh_vqvae", "01_mesh_vqvae"]
    bars = ax.patches
    assert [round(b.get_x() * 60, 1) for b in bars] == [0.0, 0.5, 662.0]
    assert [round(b.get_width() * 60, 1) for b in bars] == [264.0, 660.0, 43.0]
    assert "30.7 min" in ax.get_title()
    path = save_figure(fig, tmp_path, "reproduce_timeline")
    with Image.open(path) as image:
        assert image.width > 400 and image.height > 100


def test_jobs_record_when_they_started(tmp_path):
    runner = _runner(tmp_path, (BackgroundJob("a", (), after=(), needed_by="01"),), {"a": "true"})
    runner.origin -= 10.0  # the run began 10 s before the job
    runner.wait_for("01_mesh_vqvae.ipynb")
    assert 10.0 <= runner.walls["a"]["start_s"] < 12.0


def test_environment_block_restores_values_and_absence(monkeypatch):
    import os

    from vqhps.config import environment

    monkeypatch.setenv("VQHPS_TEST_SET", "before")
    monkeypatch.delenv("VQHPS_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError):
        with environment({"VQHPS_TEST_SET": "during", "VQHPS_TEST_UNSET": "1"}):
            assert os.environ["VQHPS_TEST_SET"] == "during" and os.environ["VQHPS_TEST_UNSET"] == "1"
            raise RuntimeError("a failing block restores too")
    assert os.environ["VQHPS_TEST_SET"] == "before" and "VQHPS_TEST_UNSET" not in os.environ


def test_concurrent_trainings_share_the_cores_with_at_least_two_threads_each(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert [threads_per_process(n) for n in (0, 1, 4, 5, 40)] == [64, 64, 16, 12, 2]
