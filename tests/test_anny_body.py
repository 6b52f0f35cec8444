"""The embedded body model: convention, symmetry and the fitted joint regressors."""
import numpy as np
import torch

from vqhps.body.base import H36M17_NAMES, SMPL24_NAMES
from vqhps.body.regressors import regressor_error_mm
from vqhps.body_setup import posed_samples


def test_surface_and_convention(body):
    v = body.template.numpy()
    assert body.n_vertices == 13348 and body.faces.max() < body.n_vertices
    assert np.ptp(v[:, 1]) > np.ptp(v[:, 0]) and np.ptp(v[:, 1]) > np.ptp(v[:, 2])  # y is up
    joints = body.joints24(body.template[None])[0].numpy()
    assert joints[SMPL24_NAMES.index("left_hip"), 0] > 0 > joints[SMPL24_NAMES.index("right_hip"), 0]
    assert joints[SMPL24_NAMES.index("head"), 1] > joints[SMPL24_NAMES.index("pelvis"), 1]
    # the face is on the +z side of the head
    head = joints[SMPL24_NAMES.index("head")]
    near = np.linalg.norm(v - head, axis=1) < 0.12
    assert v[near, 2].max() - head[2] > head[2] - v[near, 2].min()


def test_vertex_flip_is_a_mirror_symmetry(body):
    flip = body.vertex_flip.numpy()
    v = body.template.numpy()
    assert (flip[flip] == np.arange(len(flip))).mean() > 0.99
    assert np.abs(v[flip] * [-1, 1, 1] - v).max() < 2e-3


def test_joint_flip_maps_swap_sides():
    from vqhps.body.base import mirror_index

    idx = mirror_index(SMPL24_NAMES)
    assert SMPL24_NAMES[int(idx[SMPL24_NAMES.index("left_wrist")])] == "right_wrist"
    assert int(idx[0]) == 0
    idx17 = mirror_index(H36M17_NAMES)
    assert (idx17[idx17] == torch.arange(17)).all()


def test_regressors_reproduce_bone_heads_on_held_out_poses(body):
    """Mean distance to the imitated skeleton points <= 5 mm over 1,000 poses/shapes not used for fitting."""
    verts, j24, j17 = posed_samples(body, 1000, seed=987654)
    err24 = regressor_error_mm(body.regressor24.double().numpy(), verts, j24)
    err17 = regressor_error_mm(body.regressor17.double().numpy(), verts, j17)
    assert err24.mean() <= 5.0, err24
    assert err17.mean() <= 5.0, err17


def test_regressors_are_sparse_nonnegative_and_translation_equivariant(body):
    for reg in (body.regressor24, body.regressor17):
        r = reg.numpy()
        assert (r >= 0).all()
        assert np.allclose(r.sum(1), 1.0, atol=1e-5)
        assert (r > 0).sum(1).max() <= 64
    shift = torch.tensor([0.3, -1.0, 2.0])
    a = body.joints24(body.template[None] + shift)
    b = body.joints24(body.template[None]) + shift
    assert torch.allclose(a, b, atol=1e-5)


def test_identifier_is_stable(body):
    assert body.identifier() == body.identifier() and body.identifier().startswith("anny-13348-")


def test_template_bytes_do_not_depend_on_the_thread_count(body, smoke_cfg):
    """Hashes of the template (mesh hierarchy, checkpoints) must not change with the machine's threads."""
    from vqhps.body.anny_body import AnnyBody

    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        again = AnnyBody(smoke_cfg.paths.anny_cache)
    finally:
        torch.set_num_threads(before)
    assert again.template.numpy().tobytes() == body.template.numpy().tobytes()


def test_phenotype_interpolation_weights_by_hand():
    from vqhps.body.anny_body import interpolation_coefficients

    anchors = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    value = torch.tensor([0.2, 0.75, 0.5, 1.0, -0.1, 1.2], dtype=torch.float64, requires_grad=True)
    expected = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                             [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    weights = interpolation_coefficients(value, anchors)
    torch.testing.assert_close(weights, expected)
    # d(weights)/d(value) = -+1 / (anchor spacing) on the bracketing pair, 0 once clamped
    (weights * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(value.grad, torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    extrapolated = interpolation_coefficients(torch.tensor([-0.1, 1.2], dtype=torch.float64), anchors, extrapolate=True)
    torch.testing.assert_close(extrapolated, torch.tensor([[1.2, -0.2, 0.0], [0.0, -0.4, 1.4]], dtype=torch.float64))


def test_phenotype_blendshape_weights_match_anny_in_values_and_gradients(body):
    """The pairwise product that replaces anny's torch.prod (whose backward syncs with the GPU) gives
    anny's weights and gradients, phenotypes at the ends of their ranges (zero factors) included."""
    import anny.models.phenotype
    from vqhps.body.anny_body import phenotype_blendshape_weights

    assert anny.models.phenotype.phenotype_blendshape_weights is phenotype_blendshape_weights
    anchors = anny.models.phenotype.make_phenotype_anchors(torch.float64, torch.device("cpu"))
    n_variations = 26
    mask = (torch.rand(40, n_variations, generator=torch.Generator().manual_seed(0)) < 0.15).double()
    labels = ["gender", "age", "muscle", "weight", "height", "proportions"]
    params = torch.rand(5, len(labels), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params[0] = 0.0
    params[1] = 1.0  # interpolation weights of exactly 0: zero factors, where torch.prod's backward branches
    ours = params.clone().requires_grad_(True)
    theirs = params.clone().requires_grad_(True)
    expected = _anny_module_copy().phenotype_blendshape_weights(theirs, labels, anchors, mask, extrapolate=False)
    got = phenotype_blendshape_weights(ours, labels, anchors, mask, extrapolate=False)
    torch.testing.assert_close(got, expected)
    probe = torch.randn_like(expected)
    (got * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def _anny_module_copy():
    """A fresh copy of ``anny.models.phenotype``, whose functions are anny's own (unpatched)."""
    import importlib.util

    import anny.models.phenotype

    spec = importlib.util.spec_from_file_location("anny_phenotype_copy", anny.models.phenotype.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_anny_uses_the_device_side_interpolation(body):
    import anny.utils.interpolation
    from vqhps.body.anny_body import interpolation_coefficients

    assert anny.utils.interpolation.linear_interpolation_coefficients is interpolation_coefficients


def test_nothing_under_the_body_layer_imports_the_data_layer():
    """vqhps.body sits below vqhps.data: the poses the regressors are fitted on come from above
    (vqhps.body_setup), never through an import that runs back up the layers."""
    import ast
    from pathlib import Path

    import vqhps.body

    offenders = []
    for path in sorted(Path(vqhps.body.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = {0: "", 1: "vqhps.body.", 2: "vqhps."}[node.level]
                names = [package + (node.module or "")]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("vqhps.data")]
    assert not offenders, offenders


def test_setup_body_fits_missing_regressors_into_the_cache(tmp_path, smoke_cfg):
    """A fresh cache: load_body says how to fit the regressors, setup_body fits and caches them once."""
    import pytest

    from vqhps.body import RegressorsNotFitted, load_body
    from vqhps.body.regressors import regressor_path
    from vqhps.body_setup import setup_body
    from vqhps.config import load_config

    cfg = load_config("smoke", **{"body.regressor_fit_samples": 60})
    cfg.paths.cache = tmp_path
    (tmp_path / "anny").symlink_to(smoke_cfg.paths.anny_cache, target_is_directory=True)
    with pytest.raises(RegressorsNotFitted, match="setup-body"):
        load_body(cfg)
    body = setup_body(cfg)
    assert regressor_path(body, tmp_path / "regressors", 60, cfg.body.regressor_seed).is_file()
    for reg in (body.regressor24, body.regressor17):
        r = reg.numpy()
        assert (r >= 0).all() and np.allclose(r.sum(1), 1.0, atol=1e-5) and (r > 0).sum(1).max() <= 64
    assert setup_body(cfg) is body and load_body(cfg) is body
