"""The embedded body model: convention, symmetry and the fitted joint regressors."""
import numpy as np
import torch

from vqhps.body.base import H36M17_NAMES, SMPL24_NAMES
from vqhps.body.regressors import posed_samples, regressor_error_mm


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
