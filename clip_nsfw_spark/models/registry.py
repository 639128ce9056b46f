"""The model registry: every head this package knows, where its file comes from and what it must hash to.

Data only, no IO: names and aliases, file names and URLs, integrity pins (sha256 or git blob id), input
widths, CLIP model, default score column and threshold. ``models.py`` fetches, verifies and converts them.
"""

from __future__ import annotations

import dataclasses
import os

BASE_URL = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
# A mirror (an internal artifact store, or a local server in tests) can replace it; sha256 pins still apply.
BASE_URL_ENV = "CLIP_NSFW_BASE_URL"
PORTABLE_SUFFIX = ".nsfw.npz"


GITHUB_BASE_URL = "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/"

KIND_KERAS_ZIP = "keras-zip"  # a zip of an Autokeras SavedModel (converted with TensorFlow, once)
KIND_TORCH = "torch-state-dict"  # a PyTorch state dict of a Linear/ReLU MLP (read without unpickling code)
KIND_PROMPTS = "prompts"  # a .npy of two unit-length CLIP text embeddings (clip-retrieval's violence rule)
KINDS = (KIND_KERAS_ZIP, KIND_TORCH, KIND_PROMPTS)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One head as a user asks for it (``models:`` in YAML, ``--model`` repeated, ``load_head``): a registry
    name or a path, and optionally its own score column (default: the registry's, ``punsafe`` or
    ``pviolence``) and threshold (default: the run's ``threshold``, else the registry's). heads.resolve_head
    turns it into the one ``contract.Head`` executors receive."""

    model: str
    score_column: str | None = None
    threshold: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry model: what it is, where it comes from and what its file must hash to.

    Exactly one integrity pin is set: ``sha256`` (hex sha256 of the file), or ``git_blob`` (hex sha1 of
    ``b"blob <size>\\0" + content``, the id git gives the file, for files whose sha256 is not published).
    ``score_column``/``threshold`` are the head's defaults when several heads score one pass (heads.py).
    """

    name: str
    file_name: str
    dim: int
    clip_model: str
    kind: str = KIND_KERAS_ZIP
    sha256: str | None = None
    git_blob: str | None = None
    aliases: tuple[str, ...] = ()
    base_url: str = BASE_URL
    score_column: str = "punsafe"
    threshold: float = 0.5
    score: str = "sigmoid output in [0, 1], 1 = NSFW"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, found {self.kind!r}")
        if (self.sha256 is None) == (self.git_blob is None):
            raise ValueError(f"{self.name}: give exactly one integrity pin (sha256 or git_blob)")

    @property
    def pin(self) -> tuple[str, str]:
        """``("sha256", hex)`` or ``("git blob id", hex)``."""
        return ("sha256", self.sha256) if self.sha256 else ("git blob id", self.git_blob)

    @property
    def url(self) -> str:
        # A mirror serves every file flat under one base URL, whatever the upstream paths look like.
        base = os.environ.get(BASE_URL_ENV) or self.base_url
        return base.rstrip("/") + "/" + self.file_name


REGISTRY: dict[str, ModelSpec] = {
    "vit-l-14": ModelSpec(
        name="vit-l-14",
        file_name="clip_autokeras_binary_nsfw.zip",
        sha256="905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a",
        dim=768,
        clip_model="ViT-L/14",
    ),
    "vit-b-32": ModelSpec(
        name="vit-b-32",
        file_name="clip_autokeras_nsfw_b32.zip",
        sha256="78715ab9d64485167e8c9ade3b8e6761a17a16c24d114bd47431ac1dab46462b",
        dim=512,
        clip_model="ViT-B/32",
    ),
    "vit-h-14": ModelSpec(
        name="vit-h-14",
        file_name="h14_nsfw.pth",
        git_blob="5c5d8ecea5da82f9e6f1201692691f9f8874759d",
        dim=1024,
        clip_model="ViT-H/14 (OpenCLIP)",
        kind=KIND_TORCH,
        aliases=("open_clip:ViT-H-14",),
        base_url=GITHUB_BASE_URL,
        score="raw output of the last Linear (no sigmoid, not clipped to [0, 1]); higher = NSFW",
    ),
    "violence-l-14": ModelSpec(
        name="violence-l-14",
        file_name="violence_detection_vit_l_14.npy",
        sha256="cc08f81ef50b1ef71452ddc87285fe6fbbc01b6fe8f8b8c24482c386ef2ab7e1",
        dim=768,
        clip_model="ViT-L/14",
        kind=KIND_PROMPTS,
        base_url=GITHUB_BASE_URL,
        score_column="pviolence",
        score="softmax(100 * x @ prompts.T)[1], >= 0.5 exactly when argmax(x @ prompts.T) == 1",
    ),
    "violence-b-32": ModelSpec(
        name="violence-b-32",
        file_name="violence_detection_vit_b_32.npy",
        sha256="76909cca3e77abbbb21313895756773a9c6fb26c9cc743f3ef0625f025741982",
        dim=512,
        clip_model="ViT-B/32",
        kind=KIND_PROMPTS,
        base_url=GITHUB_BASE_URL,
        score_column="pviolence",
        score="softmax(100 * x @ prompts.T)[1], >= 0.5 exactly when argmax(x @ prompts.T) == 1",
    ),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("/", "-").replace("_", "-")


def canonical_name(name: str) -> str | None:
    """Return the registry key for ``name`` ("ViT-L/14", "vit_l_14", "open_clip:ViT-H-14" …), or None."""
    key = _key(name)
    if key in REGISTRY:
        return key
    return next((spec.name for spec in REGISTRY.values() if key in {_key(a) for a in spec.aliases}), None)


def model_for_dim(dim: int) -> str | None:
    """The registry NSFW model whose input dimension is ``dim``, or None."""
    return next((spec.name for spec in REGISTRY.values() if spec.dim == dim and spec.score_column == "punsafe"),
                None)


def fitting_model_hint(dim: int) -> str:
    """'; the model for 512-d embeddings is 'vit-b-32' (--model vit-b-32)', or '' if none fits."""
    fits = model_for_dim(dim)
    return f"; the model for {dim}-d embeddings is {fits!r} (--model {fits})" if fits else ""
