"""The synthetic benchmark (3DPW analogue): posed anny bodies rendered with pyrender over photographs
and textures, with full labels, written as checksummed shards with a manifest.

Each shard is a deterministic function of (seed, split, shard index): a missing or corrupt shard is
rebuilt alone, and a manifest that does not match the requested settings is never used.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config import environment
from .backgrounds import background
from .sample import crop_affine, project_points, square_bbox

GENERATOR_VERSION = 3  # 3: eyes, hair, garment fronts and backs, continuous skin tones
SPLITS = ("train", "val", "test")
SPLIT_ID = {"train": 0, "val": 1, "test": 2}
#: subject ids of split s are SUBJECT_OFFSET * SPLIT_ID[s] + k: disjoint by construction
SUBJECT_OFFSET = 1_000_000
LIGHT_NAMES = ("normal", "dim", "harsh")

#: keys of a stored sample and their per-sample shapes (S = crop size)
SHARD_KEYS = ("image", "joints2d_24", "joints2d_17", "root_rot", "trans", "K", "bbox", "pose", "shape",
              "subject", "valid", "light", "occlusion", "in_frame", "yaw", "background")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything a split's content depends on; the manifest records it and must match to be reused."""

    split: str
    n: int
    seed: int
    render_size: int
    crop_size: int
    shard_size: int
    occluder_prob: float
    bad_light_prob: float
    truncation_prob: float
    body_id: str
    version: int = GENERATOR_VERSION

    @property
    def n_shards(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    def shard_count(self, shard: int) -> int:
        return min(self.shard_size, self.n - shard * self.shard_size)


def split_size(cfg, split: str) -> int:
    return {"train": cfg.data.n_train, "val": cfg.data.n_val, "test": cfg.data.n_test}[split]


def make_spec(cfg, split: str, body_id: str) -> BenchmarkSpec:
    d = cfg.data
    return BenchmarkSpec(split=split, n=split_size(cfg, split), seed=d.seed, render_size=d.render_size,
                         crop_size=d.crop_size, shard_size=d.shard_size, occluder_prob=d.occluder_prob,
                         bad_light_prob=d.bad_light_prob, truncation_prob=d.truncation_prob, body_id=body_id)


# ----------------------------------------------------------------------------------------------- subjects
def subject_pool(split: str, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Subject ids and their phenotypes (the body model's adult ranges) for a split: ~50 images each."""
    from vqhps.body.anny_body import sample_phenotypes

    n_subjects = max(4, n_images // 50)
    pheno = sample_phenotypes(np.random.default_rng([seed, SPLIT_ID[split], 7919]), n_subjects)
    ids = SUBJECT_OFFSET * SPLIT_ID[split] + np.arange(n_subjects)
    return ids, pheno


def shard_parameters(spec: BenchmarkSpec, shard: int) -> tuple[np.random.Generator, dict[str, np.ndarray]]:
    """Who is in a shard and how they stand: subject ids, phenotypes, poses and trunk pitch, drawn
    before any rendering (so the meshes of a split are known without rendering it). Returns the
    shard's random generator, positioned for the scene draws that follow."""
    from vqhps.data.poses import PoseSampler

    n = spec.shard_count(shard)
    rng = np.random.default_rng([spec.seed, SPLIT_ID[spec.split], shard, 1])
    ids, pheno = subject_pool(spec.split, spec.n, spec.seed)
    who = rng.integers(len(ids), size=n)
    pose, info = PoseSampler(seed=int(spec.seed * 1000 + SPLIT_ID[spec.split] * 100_000 + shard)).sample(n)
    return rng, {"pose": np.asarray(pose, dtype=np.float32), "shape": pheno[who], "subject": ids[who],
                 "root_pitch": np.asarray(info["root_pitch"], dtype=np.float32)}


def split_meshes(cfg, split: str, body_id: str = "") -> dict[str, np.ndarray]:
    """Pose and shape of every image of a split, without rendering: what the Mesh-VQ-VAE fine-tunes
    and is tested on (the split's canonical meshes follow from them)."""
    spec = make_spec(cfg, split, body_id)
    parts = [shard_parameters(spec, shard)[1] for shard in range(spec.n_shards)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("pose", "shape", "subject")}


# ----------------------------------------------------------------------------------------------- geometry
def rotation_x(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def rotation_y(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def rotation_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def sample_view(canonical: np.ndarray, size: int, rng: np.random.Generator, truncate: bool, pitch: float = 0.0):
    """Root rotation, translation and intrinsics placing a canonical mesh in a random full frame.

    Yaw covers the full circle (so 180-degree flips appear), with the pose's own forward trunk
    ``pitch`` (bending poses), small body tilt and a random camera elevation; the body fills 45-75%
    of the frame height unless ``truncate`` pushes it past an edge."""
    yaw = rng.uniform(-180.0, 180.0)
    body_tilt = (rotation_x(np.clip(rng.normal(0, 8), -20, 20)) @ rotation_z(np.clip(rng.normal(0, 5), -15, 15))
                 @ rotation_x(pitch))
    # camera frame <- body frame, body facing the camera: y up -> y down, z toward camera -> -z
    facing = np.diag([1.0, -1.0, -1.0])
    elevation = rotation_x(-rng.uniform(-10.0, 30.0))
    root_rot = elevation @ facing @ rotation_y(yaw) @ body_tilt
    fov = rng.uniform(35.0, 70.0)
    f = 0.5 * size / np.tan(np.radians(fov) / 2)
    K = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1.0]])
    rotated = canonical @ root_rot.T
    extent = max(float(np.ptp(rotated[:, 1])), float(np.ptp(rotated[:, 0])), 0.3)
    dist = f * extent / (rng.uniform(0.45, 0.75) * size)
    centre = rng.uniform(-0.06, 0.06, 2) * size
    if truncate:
        side = rng.integers(4)
        shift = rng.uniform(0.2, 0.45) * extent * f / dist
        centre[side % 2] += shift if side < 2 else -shift
    trans = np.array([centre[0] * dist / f, centre[1] * dist / f, dist])
    return root_rot, trans, K, yaw


# ----------------------------------------------------------------------------------------------- appearance
#: anchors of a continuous skin-tone scale, light to dark (a tone is drawn anywhere along it)
SKIN_TONES = np.array([[255, 224, 196], [234, 192, 160], [198, 145, 110], [160, 110, 80], [110, 72, 50],
                       [80, 52, 38]], dtype=np.float32)
#: natural hair colours: black, dark brown, brown, light brown, blond, auburn, red, grey
HAIR_COLORS = np.array([[20, 17, 15], [45, 30, 22], [85, 55, 35], [130, 95, 60], [205, 170, 110],
                        [120, 50, 25], [165, 75, 35], [170, 170, 165]], dtype=np.float32)
HAIR_WEIGHTS = np.array([0.3, 0.22, 0.16, 0.1, 0.08, 0.05, 0.03, 0.06])
#: iris colours: dark brown, brown, hazel, green, blue, grey
IRIS_COLORS = np.array([[45, 28, 18], [90, 56, 30], [120, 90, 50], [80, 110, 70], [70, 110, 160],
                        [110, 120, 130]], dtype=np.float32)
HAIR_STYLES = ("short", "long", "cap", "shaved")
TOP_DETAILS = ("plain", "print", "band", "zip", "open_jacket")


def skin_tone(rng: np.random.Generator) -> np.ndarray:
    """An RGB skin colour anywhere along SKIN_TONES (linear between anchors), with brightness and tint."""
    t = rng.uniform(0.0, len(SKIN_TONES) - 1.0)
    k = min(int(t), len(SKIN_TONES) - 2)
    base = SKIN_TONES[k] + (t - k) * (SKIN_TONES[k + 1] - SKIN_TONES[k])
    return base * rng.uniform(0.92, 1.06) + rng.normal(0.0, 5.0, 3)


class _Region:
    """A subset of the body's vertices: their indices and rest-pose quantities (float32), what the
    per-image colour rules threshold."""

    def __init__(self, mask: np.ndarray, **fields: np.ndarray):
        self.idx = np.flatnonzero(mask)
        for name, values in fields.items():
            setattr(self, name, np.asarray(values)[self.idx].astype(np.float32))


class Appearance:
    """Per-vertex colours of a rendered person whose front differs from the back: skin, a face with
    eyes, eyebrows and lips, hair (short, long, a cap or shaved), a top whose front carries a
    neckline and a print, band, zip or open jacket, trousers or shorts with back pockets and a belt
    buckle in front, shoes with soles.

    Every region is decided from the rest-pose template in the body frame (y up, facing +z, left =
    +x), so a pattern stays on its skin when the body is posed. The rest-pose quantities are computed
    once here; per image only thresholds and colours are drawn (vectorised numpy on small vertex
    subsets). Colours cover the body's vertices, then the eyeballs' (``AnnyBody.eye_index``) when the
    body model has them."""

    def __init__(self, body):
        import trimesh

        t = body.template.cpu().numpy().astype(np.float64)
        faces = body.faces.cpu().numpy()
        self.parts = vertex_parts(body)
        self.n_body = len(t)
        nz = np.asarray(trimesh.Trimesh(t, faces, process=False).vertex_normals)[:, 2]
        with torch.no_grad():
            rest = body.rest_pose(1)
            mean_shape = torch.full((1, body.shape_dim), 0.5)
            heads = body.pose_with_bones(rest, mean_shape)["bone_heads"][0].double().numpy()
            eyes = body.pose_with_eyes(rest, mean_shape)[1][0].double().numpy() if hasattr(body, "pose_with_eyes") \
                else np.zeros((0, 3))
        bone = {label: heads[i] for i, label in enumerate(body.bone_labels)}
        part = {name: self.parts == i for i, name in enumerate(PART_NAMES)}
        x, y, z = t.T
        ax = np.abs(x)
        # signed depth in front of the trunk's mid-plane at the vertex's height (+: front)
        mid_y, mid_z = self._mid_plane(t, part["torso"] | part["upper_leg"])
        depth = z - np.interp(y, mid_y, mid_z)
        torso, head, foot = part["torso"], part["head"], part["foot"]
        legs = part["upper_leg"] | part["lower_leg"]
        # landmarks: where the torso part meets the neck in front (the neckline's top) and behind,
        # the hip joints (the top's hem and the trousers' waistband sit just above them), the soles
        self.neck_y = float(y[torso & (depth > 0) & (ax < 0.03)].max())
        self.neck_back_y = float(y[torso & (depth < 0) & (ax < 0.03)].max())
        self.hip_y = float(bone["upperleg01.L"][1])
        sole_y = float(y[foot].min())
        # head frame: origin between the eyes (without eyeballs: the head bone, shifted to the eyes)
        centre = eyes.mean(0) if len(eyes) else bone["head"] + np.array([0.0, 0.04, 0.08])
        hy, hz = y - centre[1], z - centre[2]

        self.trunk = _Region(torso, x=x, y=y, nz=nz, depth=depth)
        self.seat = _Region((torso | legs) & (y < self.hip_y + 0.06) & (y > self.hip_y - 0.15),
                            x=x, y=y, nz=nz, depth=depth)
        self.head = _Region(head, ax=ax, hy=hy, hz=hz)
        self.back = _Region((torso | head) & (depth < -0.01), y=y, ax=ax)  # where long hair falls
        self.sole = np.flatnonzero(foot & (y < sole_y + 0.012))
        self.toe = np.flatnonzero(foot & (y >= sole_y + 0.012) & (z > np.quantile(z[foot], 0.8)))
        face = head & (hz > -0.04)
        arch = 8.0 * (ax - 0.03) ** 2
        self.brows = np.flatnonzero(face & (hy > 0.017 - arch) & (hy < 0.029 - arch) & (ax > 0.01) & (ax < 0.052))
        self.lips = np.flatnonzero(face & (hz > 0.0) & ((ax / 0.024) ** 2 + ((hy + 0.071) / 0.011) ** 2 < 1))
        # per-vertex texture amplitude: the dense face mesh shows noise as blotches, so half there
        self.noise_scale = np.where(head, 0.5, 1.0).astype(np.float32)[:, None]
        # eyeballs: 0 sclera, 1 iris, 2 pupil, by the angle between a vertex's direction from its
        # eyeball's centre and the gaze (+z)
        self.n_eyes = len(eyes)
        if len(eyes):
            left = eyes[:, 0] > 0
            d = eyes - np.where(left[:, None], eyes[left].mean(0), eyes[~left].mean(0))
            cos = d[:, 2] / np.linalg.norm(d, axis=1)
            self.eye_class = (cos > 0.87).astype(np.int64) + (cos > 0.96)
        else:
            self.eye_class = np.zeros(0, np.int64)

    @staticmethod
    def _mid_plane(t: np.ndarray, mask: np.ndarray, step: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        """Heights and the mid depth of the trunk's central strip (|x| < 6 cm) at those heights."""
        strip = mask & (np.abs(t[:, 0]) < 0.06)
        ys = np.arange(t[strip, 1].min(), t[strip, 1].max() + step, step)
        mid = []
        for y in ys:
            s = strip & (np.abs(t[:, 1] - y) < step)
            mid.append(0.5 * (t[s, 2].min() + t[s, 2].max()) if s.any() else np.nan)
        mid = np.asarray(mid)
        ok = ~np.isnan(mid)
        return ys[ok], mid[ok]

    def hair(self, front: float, side: float, back: float) -> np.ndarray:
        """Indices of the head vertices above a hairline whose height (metres above the eyes) falls
        from ``front`` (forehead) through ``side`` (around the ears) to ``back`` (the nape)."""
        h = self.head
        # hairline height against depth behind the eyes: face, temples, behind the ears, back of the head
        level = np.interp(-h.hz, [0.03, 0.055, 0.10, 0.13], [front, side, side, back])
        return h.idx[h.hy > level]

    def colors(self, rng: np.random.Generator) -> np.ndarray:
        """(V + E, 4) uint8 RGBA colours of the body's vertices then the eyeballs'. Draws the same
        sequence from ``rng`` whatever the outcome (deterministic, order-stable)."""
        n = self.n_body
        # ---- draws (all of them, always, in this order)
        skin = skin_tone(rng)
        top, under, bottom, shoes, accent, cap = rng.uniform(0, 255, (6, 3))
        hair = HAIR_COLORS[rng.choice(len(HAIR_COLORS), p=HAIR_WEIGHTS)] * rng.uniform(0.8, 1.2) \
            * (1.0 + rng.normal(0, 0.04, 3))  # a multiplicative tint: an additive one turns dark hair green
        iris = IRIS_COLORS[rng.integers(len(IRIS_COLORS))] * rng.uniform(0.8, 1.2)
        sleeve = rng.integers(3)  # 0 none, 1 short, 2 long
        long_legs = rng.random() < 0.7
        style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=[0.45, 0.3, 0.15, 0.1])]
        hairline, fringe, hair_len, hair_width = rng.uniform(0, 1, 4)
        neckline, neck_depth, neck_width = rng.integers(3), rng.random(), rng.random()
        trim = rng.random() < 0.3
        detail = TOP_DETAILS[rng.choice(len(TOP_DETAILS), p=[0.15, 0.25, 0.15, 0.2, 0.25])]
        print_x, print_y, print_w, print_h, print_round = rng.uniform(0, 1, 5)
        back_panel, back_shade = rng.random() < 0.3, rng.uniform(0.65, 0.85)
        waist = rng.uniform(0.0, 0.06)
        pockets, pocket_shade = rng.random() < 0.6, rng.uniform(0.55, 0.8)
        belt, belt_color = rng.random() < 0.4, rng.uniform(10, 90, 3)
        fly = rng.random() < 0.5
        sole = np.array([[235.0, 235, 230], [30, 28, 26], [150, 110, 70]])[rng.integers(3)]
        noise = rng.random((n, 2), dtype=np.float32) - 0.5  # brightness, warmth
        eye_noise = rng.random((self.n_eyes, 1), dtype=np.float32) - 0.5

        # ---- body parts
        palette = np.stack([skin, top, top if sleeve >= 1 else skin, top if sleeve == 2 else skin, skin,
                            bottom, bottom if long_legs else skin, shoes]).astype(np.float32)
        col = np.take(palette, self.parts, axis=0)

        # ---- top: neckline on the front (crew, round or V), details on the front, a darker back
        tr = self.trunk
        upper, front, ax = tr.y > self.hip_y + waist, tr.depth > 0, np.abs(tr.x)
        col[tr.idx[~upper]] = bottom  # below the hem: the trousers' waistband
        depth = (0.01 + 0.02 * neck_depth, 0.03 + 0.04 * neck_depth, 0.06 + 0.08 * neck_depth)[neckline]
        half_w = 0.045 + 0.04 * neck_width
        u = np.minimum(ax / half_w, 1.0)
        hem = self.neck_y - depth * (np.sqrt(1.0 - u ** 2) if neckline < 2 else 1.0 - u)
        opening = upper & front & (tr.y > hem - 0.005) & (ax < half_w)
        if trim:  # a collar band around the opening and along the back of the neck
            col[tr.idx[upper & front & (tr.y > hem - 0.02) & (ax < half_w + 0.015)]] = accent
            col[tr.idx[upper & ~front & (tr.y > self.neck_back_y - 0.015)]] = accent
        chest = upper & (tr.nz > 0.25)
        if detail == "print":
            cx, cy = (print_x - 0.5) * 0.1, self.neck_y - 0.12 - 0.1 * print_y
            w, h = 0.02 + 0.06 * print_w, 0.02 + 0.05 * print_h
            inside = ((tr.x - cx) / w) ** 2 + ((tr.y - cy) / h) ** 2 < 1 if print_round < 0.5 else \
                (np.abs(tr.x - cx) < w) & (np.abs(tr.y - cy) < h)
            col[tr.idx[chest & inside]] = accent
        elif detail == "band":
            cy, h = self.neck_y - 0.1 - 0.15 * print_y, 0.015 + 0.035 * print_h
            col[tr.idx[chest & (np.abs(tr.y - cy) < h)]] = accent
        elif detail == "zip":
            col[tr.idx[upper & front & (ax < 0.006 + 0.006 * print_w)]] = accent * 0.3 + 30
        elif detail == "open_jacket":
            gap = 0.025 + 0.04 * print_w + 0.25 * np.maximum(tr.y - (self.neck_y - 0.2), 0.0)
            col[tr.idx[upper & front & (ax < gap)]] = under
        if back_panel:
            col[tr.idx[upper & ~front]] *= back_shade
        col[tr.idx[opening]] = skin

        # ---- trousers: back pockets, a fly and a belt with its buckle in front
        se = self.seat
        worn, ax = se.y < self.hip_y + waist, np.abs(se.x)
        if pockets:
            col[se.idx[worn & (se.nz < -0.3) & (se.y > self.hip_y - 0.1) & (se.y < self.hip_y + waist - 0.02)
                       & (ax > 0.025) & (ax < 0.12)]] *= pocket_shade
        if fly:
            col[se.idx[worn & (se.depth > 0) & (ax < 0.006) & (se.y > self.hip_y - 0.09)]] *= 0.6
        if belt:
            band = worn & (se.y > self.hip_y + waist - 0.025)
            col[se.idx[band]] = belt_color
            col[se.idx[band & (se.depth > 0) & (ax < 0.022)]] = (200, 185, 120)  # the buckle

        # ---- shoes: soles and a toe cap
        col[self.sole] = sole
        col[self.toe] *= 0.75

        # ---- face and hair (the face stays skin): eyebrows, lips, hair by style
        col[self.brows] = hair * 0.7 + skin * 0.1
        col[self.lips] = skin * np.array([0.85, 0.6, 0.62])
        front_level = 0.055 + 0.02 * hairline if fringe > 0.35 else 0.03 + 0.015 * hairline
        if style == "short":
            col[self.hair(front_level, 0.025, -0.06 - 0.03 * hair_len)] = hair
        elif style == "long":  # over the ears, down the neck and the back
            col[self.hair(front_level, -0.09 - 0.02 * hair_len, -0.22)] = hair
            b = self.back
            col[b.idx[(b.y > self.neck_back_y - 0.05 - 0.3 * hair_len) & (b.ax < 0.07 + 0.06 * hair_width)]] = hair
        elif style == "cap":
            col[self.hair(0.1, 0.02, -0.06)] = hair  # short hair below the cap at the back and sides
            h = self.head
            crown = h.hy > 0.045 - 0.1 * np.maximum(-h.hz - 0.05, 0.0)
            col[h.idx[crown]] = cap
            col[h.idx[crown & (h.hz > -0.03) & (h.ax < 0.035) & (h.hy < 0.09)]] = accent  # a logo on its front
        else:  # shaved: stubble, the skin darkened toward the hair colour
            col[self.hair(front_level, 0.02, -0.06)] = 0.6 * skin + 0.4 * hair

        # ---- per-vertex texture: brightness (relative and absolute) and a little warmth
        noise *= self.noise_scale
        col *= 1.0 + 0.17 * noise[:, :1] + 0.05 * noise[:, 1:] * np.array([1.0, 0.0, -1.0], np.float32)
        col += 10.0 * noise[:, :1]
        out = np.empty((n + self.n_eyes, 4), np.uint8)
        out[:, 3] = 255
        out[:n, :3] = np.clip(col, 0, 255, out=col)

        # ---- eyes: white sclera, iris and pupil facing forward
        if self.n_eyes:
            eye = np.take(np.array([[235.0, 230, 222], iris, [12, 10, 10]], np.float32), self.eye_class, axis=0)
            out[n:, :3] = np.clip(eye + 10.0 * eye_noise, 0, 255)
        return out


PART_NAMES = ("head", "torso", "upper_arm", "lower_arm", "hand", "upper_leg", "lower_leg", "foot")


def part_of_bone(label: str) -> int:
    """Body part of an anny bone label (for clothing colours)."""
    rules = (("neck", "head"), ("head", "head"), ("eye", "head"), ("upperarm", "upper_arm"),
             ("lowerarm", "lower_arm"), ("wrist", "hand"), ("finger", "hand"), ("metacarpal", "hand"),
             ("upperleg", "upper_leg"), ("lowerleg", "lower_leg"), ("foot", "foot"), ("toe", "foot"))
    for key, part in rules:
        if label.startswith(key):
            return PART_NAMES.index(part)
    return PART_NAMES.index("torso")


def vertex_parts(body) -> np.ndarray:
    """Part id of each body vertex from its most weighted bone."""
    idx = body.model.vertex_bone_indices.cpu().numpy()[body.keep.cpu().numpy()]
    w = body.model.vertex_bone_weights.cpu().numpy()[body.keep.cpu().numpy()]
    dominant = idx[np.arange(len(idx)), w.argmax(1)]
    bone_part = np.array([part_of_bone(b) for b in body.bone_labels])
    return bone_part[dominant]


def add_occluder(image: np.ndarray, body_mask: np.ndarray, rng: np.random.Generator, split: str) -> float:
    """Paste a textured rectangle or ellipse over the body (in place); returns the body fraction hidden."""
    s = image.shape[0]
    ys, xs = np.nonzero(body_mask)
    if len(xs) == 0:
        return 0.0
    cy, cx = ys[rng.integers(len(ys))], xs[rng.integers(len(xs))]
    hh, hw = rng.uniform(0.1, 0.3, 2) * s
    yy, xx = np.mgrid[0:s, 0:s]
    if rng.random() < 0.5:
        mask = (np.abs(yy - cy) < hh) & (np.abs(xx - cx) < hw)
    else:
        mask = ((yy - cy) / hh) ** 2 + ((xx - cx) / hw) ** 2 < 1.0
    tex, _ = background(split, s, rng)
    image[mask] = tex[mask]
    return float((mask & body_mask).sum() / max(body_mask.sum(), 1))


# ----------------------------------------------------------------------------------------------- rendering
class ShardRenderer:
    """Renders shards of one split; holds the body model, its appearance model (per-vertex region
    masks, computed once) and an offscreen renderer. The rendered mesh is the body surface plus the
    eyeballs when the body model has them; labels are the body surface alone."""

    def __init__(self, body, crop_size: int):
        from vqhps.render import MeshRenderer

        self.body = body
        self.appearance = Appearance(body)
        self.parts = self.appearance.parts
        self.faces = body.faces.cpu().numpy()
        eye_faces = body.eye_faces.cpu().numpy() if hasattr(body, "eye_faces") else np.zeros((0, 3), np.int64)
        self.render_faces = np.concatenate([self.faces, eye_faces + body.n_vertices])
        self.renderer = MeshRenderer(crop_size)
        self.crop_size = crop_size

    def pose_meshes(self, pose: np.ndarray, shape: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Canonical body meshes (centred on the body's vertex mean: the labels) and the eyeballs'
        vertices in the same frame ((N, 0, 3) for a body model without eyes)."""
        out, eyes = [], []
        with torch.no_grad():
            for i in range(0, len(pose), batch):
                p, s = torch.as_tensor(pose[i:i + batch]), torch.as_tensor(shape[i:i + batch])
                if hasattr(self.body, "pose_with_eyes"):
                    v, e = self.body.pose_with_eyes(p, s)
                else:
                    v = self.body(p, s).vertices
                    e = v.new_zeros(len(v), 0, 3)
                mean = v.mean(1, keepdim=True)
                out.append((v - mean).numpy())
                eyes.append((e - mean).numpy())
        return np.concatenate(out), np.concatenate(eyes)

    def render_shard(self, spec: BenchmarkSpec, shard: int, progress: bool = False) -> dict[str, np.ndarray]:
        rng, params = shard_parameters(spec, shard)
        pose, shape, pitch = params["pose"], params["shape"], params["root_pitch"]
        n = len(pose)
        canonical, eyes = self.pose_meshes(pose, shape)
        j24 = np.einsum("jv,nvc->njc", self.body.regressor24.numpy(), canonical)
        j17 = np.einsum("jv,nvc->njc", self.body.regressor17.numpy(), canonical)
        out = {k: [] for k in SHARD_KEYS}
        for i in tqdm(range(n), desc=f"{spec.split} shard {shard}", leave=False, disable=not progress):
            sample = self.render_one(spec, canonical[i], j24[i], j17[i], rng, float(pitch[i]), eyes[i])
            sample.update(pose=pose[i], shape=shape[i], subject=params["subject"][i])
            for k in SHARD_KEYS:
                out[k].append(sample[k])
        return {k: np.stack(v) for k, v in out.items()}

    def render_one(self, spec: BenchmarkSpec, canonical: np.ndarray, j24: np.ndarray, j17: np.ndarray,
                   rng: np.random.Generator, pitch: float = 0.0,
                   eyes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One labelled crop of a canonical mesh (plus its two joint sets and the eyeballs' vertices in
        the same frame, drawn but not labelled) in a random scene."""
        from vqhps.render import composite

        size, crop = spec.render_size, spec.crop_size
        truncate = rng.random() < spec.truncation_prob
        root_rot, trans, K, yaw = sample_view(canonical, size, rng, truncate, pitch)
        verts_cam = canonical @ root_rot.T + trans
        proj = project_points(verts_cam, K)
        bbox = square_bbox(proj, 1.2)
        affine = crop_affine(bbox, crop)
        in_frame = bool((proj >= -0.5).all() and (proj <= size - 0.5).all())
        # render the crop directly: crop pixels = affine(full-frame pixels)
        K_crop = np.vstack([affine, [0, 0, 1]]) @ K
        light = 0 if rng.random() >= spec.bad_light_prob else int(rng.integers(1, 3))
        intensity = {0: rng.uniform(2.5, 5.0), 1: rng.uniform(0.3, 0.8), 2: rng.uniform(8.0, 14.0)}[light]
        ambient = {0: rng.uniform(0.25, 0.5), 1: rng.uniform(0.02, 0.1), 2: rng.uniform(0.0, 0.05)}[light]
        light_dir = rng.normal(0, 1, 3) + np.array([0, 0.5, 1.5 if light != 2 else 0.0])
        colors = self.appearance.colors(rng)
        eyes = np.zeros((0, 3)) if eyes is None else eyes
        drawn = np.concatenate([verts_cam, eyes @ root_rot.T + trans])  # the labels' mesh, then the eyeballs
        rgba, _ = self.renderer.render(drawn, self.render_faces if len(eyes) else self.faces, K_crop,
                                       vertex_colors=colors[:len(drawn)], light_dir=light_dir,
                                       light_intensity=intensity, ambient=ambient)
        bg_full, bg_id = background(spec.split, size, rng)
        bg = warp_full_frame(bg_full, affine, crop)
        image = composite(rgba, bg)
        inside = warp_full_frame(np.full((size, size, 1), 255, np.uint8), affine, crop)[..., 0] > 127
        image[~inside] = 0  # outside the camera's frame: padding, as in a real crop
        body_mask = (rgba[..., 3] > 0) & inside
        occlusion = add_occluder(image, body_mask, rng, spec.split) if rng.random() < spec.occluder_prob else 0.0
        if light == 1:
            image = (image.astype(np.float32) * rng.uniform(0.25, 0.5)).astype(np.uint8)
        image = (image.astype(np.float32) + rng.normal(0, 3, image.shape)).clip(0, 255).astype(np.uint8)
        j2d_24 = project_points(j24 @ root_rot.T + trans, K_crop)
        j2d_17 = project_points(j17 @ root_rot.T + trans, K_crop)
        valid = in_frame and occlusion < 0.3 and light == 0
        return {"image": image, "joints2d_24": j2d_24.astype(np.float32), "joints2d_17": j2d_17.astype(np.float32),
                "root_rot": root_rot.astype(np.float32), "trans": trans.astype(np.float32),
                "K": K.astype(np.float32), "bbox": bbox.astype(np.float32), "valid": np.bool_(valid),
                "light": np.int8(light), "occlusion": np.float32(occlusion), "in_frame": np.bool_(in_frame),
                "yaw": np.float32(yaw), "background": np.int16(bg_id)}

    def views(self, pose: np.ndarray, shape: np.ndarray, yaws=(0.0, 180.0), seed: int = 0,
              background: int = 255, colors: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """One person (pose, shape: one sample's; appearance drawn from ``seed`` unless per-vertex
        RGBA ``colors`` of the drawn mesh are given) seen from each yaw (0: facing the camera) by a
        level camera framing the body, under a light from the camera, on a plain background. Per
        view: "image" (RGB), "mask" (person pixels), "depth", "K" and "rot", "trans" (camera-frame
        vertices = canonical @ rot.T + trans), with "canonical" and "eyes" (the drawn eyeballs)."""
        from vqhps.render import composite

        canonical, eyes = (m[0] for m in self.pose_meshes(np.asarray(pose)[None], np.asarray(shape)[None]))
        colors = self.appearance.colors(np.random.default_rng(seed)) if colors is None else colors
        size = self.renderer.width
        f = 0.5 * size / np.tan(np.radians(15.0))
        K = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1.0]])
        out = []
        for yaw in yaws:
            rot = np.diag([1.0, -1.0, -1.0]) @ rotation_y(yaw)  # camera on the body's +z side, y down
            v = canonical @ rot.T
            lo, hi = v.min(0), v.max(0)
            dist = float(np.max(hi[:2] - lo[:2])) * 1.08 * f / size - lo[2]  # the body fills ~93% of the frame
            t = np.array([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, dist])
            rgba, depth = self.renderer.render(np.concatenate([canonical, eyes]) @ rot.T + t, self.render_faces, K,
                                               vertex_colors=colors, light_dir=np.array([0.0, 0.3, 1.0]),
                                               light_intensity=3.5, ambient=0.35)
            image = composite(rgba, np.full((size, size, 3), background, np.uint8))
            out.append({"image": image, "mask": rgba[..., 3] > 0, "depth": depth, "K": K, "rot": rot, "trans": t,
                        "canonical": canonical, "eyes": eyes})
        return out

    def close(self) -> None:
        self.renderer.close()


def front_back_views(body, pose: np.ndarray, shape: np.ndarray, seeds=(0, 1, 2, 3),
                     size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """One pose seen from the front and from the back (yaw 0 and 180 degrees), once per appearance
    seed: the cues (face, eyes, hair, garment fronts and backs) that tell a person facing the camera
    from one facing away. Returns (front RGB, back RGB) per seed."""
    renderer = ShardRenderer(body, size)
    try:
        return [tuple(v["image"] for v in renderer.views(pose, shape, (0.0, 180.0), seed)) for seed in seeds]
    finally:
        renderer.close()


def warp_full_frame(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The crop of a full-frame image that ``affine`` (full -> crop pixels) defines; zeros outside."""
    from PIL import Image

    a = np.vstack([affine, [0, 0, 1]])
    inv = np.linalg.inv(a)
    # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f) in pixel-corner coordinates
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    m = shift @ inv @ np.linalg.inv(shift)
    channels = image.shape[2]
    pil = Image.fromarray(image if channels != 1 else image[..., 0])
    out = pil.transform((size, size), Image.AFFINE, data=tuple(m[:2].ravel()), resample=Image.BILINEAR)
    out = np.asarray(out)
    return out if channels != 1 else out[..., None]


# ----------------------------------------------------------------------------------------------- storage
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()




def shard_path(root: Path, split: str, shard: int) -> Path:
    return root / split / f"shard-{shard:04d}.npz"


def manifest_path(root: Path, split: str) -> Path:
    return root / split / "manifest.json"


class CorruptShardError(RuntimeError):
    """A shard whose bytes do not match its manifest checksum."""


def check_split(root: Path, spec: BenchmarkSpec, verify_checksums: bool = True) -> list[int]:
    """Shards of a split that are missing or corrupt (all of them when the manifest does not match)."""
    mpath = manifest_path(root, spec.split)
    if not mpath.exists():
        return list(range(spec.n_shards))
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return list(range(spec.n_shards))
    if manifest.get("spec") != asdict(spec):
        return list(range(spec.n_shards))
    bad = []
    for shard in range(spec.n_shards):
        entry = manifest["shards"].get(str(shard)) if "shards" in manifest else None
        path = shard_path(root, spec.split, shard)
        if entry is None or not path.exists() or path.stat().st_size != entry["bytes"]:
            bad.append(shard)
        elif verify_checksums and sha256_file(path) != entry["sha256"]:
            bad.append(shard)
    return bad


def _write_shard(root: Path, spec: BenchmarkSpec, shard: int, arrays: dict[str, np.ndarray]) -> dict:
    path = shard_path(root, spec.split, shard)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "n": int(len(arrays["image"]))}


def _write_manifest(root: Path, spec: BenchmarkSpec, shards: dict[str, dict]) -> None:
    manifest = {"spec": asdict(spec), "n": spec.n, "shards": shards}
    atomic_write(manifest_path(root, spec.split), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


# worker state of a spawn pool: one body model and one GL context per process
_WORKER: dict = {}


def _worker_init(cfg_dict_profile: str, overrides: dict) -> None:
    from vqhps.body import load_body
    from vqhps.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(cfg_dict_profile, **overrides)
    _WORKER["renderer"] = ShardRenderer(load_body(cfg), cfg.data.crop_size)


def _worker_render(args) -> tuple[BenchmarkSpec, int, dict]:
    spec, shard = args
    return spec, shard, _WORKER["renderer"].render_shard(spec, shard)


#: thread-count variables a render worker starts with: 14 processes each running a BLAS pool as wide
#: as the machine would oversubscribe the cores many times over
_WORKER_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def build_split(cfg, split: str, workers: int | None = None, progress: bool = True,
                overrides: dict | None = None) -> Path:
    """Render a split's missing or corrupt shards and (re)write its manifest; returns the split folder."""
    return build_splits(cfg, (split,), workers, progress, overrides)[split]


def build_splits(cfg, splits: tuple[str, ...] = SPLITS, workers: int | None = None, progress: bool = True,
                 overrides: dict | None = None) -> dict[str, Path]:
    """Render the missing or corrupt shards of ``splits`` (one worker pool for all of them, largest
    split first, so no split waits for another's last shard) and (re)write their manifests."""
    from vqhps.body import load_body

    root = cfg.data_dir / "benchmark"
    body = load_body(cfg)
    specs = {split: make_spec(cfg, split, body.identifier()) for split in splits}
    todo = {split: check_split(root, spec) for split, spec in specs.items()}
    shards: dict[str, dict[str, dict]] = {}
    for split, spec in specs.items():
        mpath = manifest_path(root, split)
        old = json.loads(mpath.read_text())["shards"] if mpath.exists() and len(todo[split]) < spec.n_shards else {}
        shards[split] = {k: v for k, v in old.items() if int(k) not in todo[split]}
    tasks = [(specs[split], shard) for split in sorted(specs, key=lambda s: -specs[s].n) for shard in todo[split]]
    workers = cfg.data.num_workers if workers is None else workers
    bar = tqdm(total=len(tasks), desc="rendering " + ", ".join(s for s in splits if todo[s]), disable=not progress)
    if tasks and workers <= 0:
        renderer = ShardRenderer(body, cfg.data.crop_size)
        try:
            for spec, shard in tasks:
                shards[spec.split][str(shard)] = _write_shard(root, spec, shard, renderer.render_shard(spec, shard))
                bar.update()
        finally:
            renderer.close()
    elif tasks:
        with environment({k: "1" for k in _WORKER_THREAD_ENV}):  # inherited by the spawned workers
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks)), initializer=_worker_init,
                          initargs=(cfg.profile, overrides or {})) as pool:
                pending = pool.imap_unordered(_worker_render, tasks)
                for _ in tasks:
                    spec, shard, arrays = pending.next(timeout=1800)
                    shards[spec.split][str(shard)] = _write_shard(root, spec, shard, arrays)
                    bar.update()
    bar.close()
    for split, spec in specs.items():
        if todo[split]:
            _write_manifest(root, spec, dict(sorted(shards[split].items(), key=lambda kv: int(kv[0]))))
    return {split: root / split for split in splits}


def build_benchmark(cfg, workers: int | None = None, progress: bool = True) -> dict[str, Path]:
    """All three splits of the profile's benchmark (cached: only missing or corrupt shards render)."""
    return build_splits(cfg, SPLITS, workers, progress)


def load_split(cfg, split: str, verify: bool = True, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of a built split (only ``keys`` when given, e.g. ("pose", "shape") without the
    images), concatenated over shards; refuses a corrupt or stale split."""
    from vqhps.body import load_body

    root = cfg.data_dir / "benchmark"
    spec = make_spec(cfg, split, load_body(cfg).identifier())
    bad = check_split(root, spec, verify_checksums=verify)
    if bad:
        raise CorruptShardError(
            f"{root / split}: shards {bad} are missing, corrupt or were built with other settings; "
            "rebuild them with vqhps.data.synthetic.build_split (or `python -m vqhps prepare`)")
    parts = []
    for shard in range(spec.n_shards):
        with np.load(shard_path(root, split, shard)) as f:
            parts.append({k: f[k] for k in f.files if keys is None or k in keys})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
