"""The written interfaces of the three kinds of model: tokenizer, latent action model, world model.

Evaluation, play, the pipeline and the World dispatch on these classes (`isinstance`), never on a
model's name or on `hasattr`. A new model subclasses one of them (next to `nn.Module`) and
implements its abstract methods; the class attributes say what the rest of the house needs to
know about it (how many pixel frames a latent frame covers, whether the model reads token ids or
continuous latents, whether it decodes its own codes).

Shapes: video (B, C, T, H, W) in [-1, 1]; token grids (B, T', h, w) long; actions (B, T) long,
`actions[:, t]` leading from frame t to t + 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor


class Tokenizer(ABC):
    """Video <-> discrete tokens. A causal tokenizer encodes the first frame alone and latent
    frame j only from pixel frames up to its own (so a world model over its tokens never sees the
    future through its context); `temporal_downsample` pixel frames make one latent frame."""

    spatial_downsample: int
    temporal_downsample: int = 1
    causal: ClassVar[bool] = True

    @property
    @abstractmethod
    def codebook_size(self) -> int: ...

    @property
    def max_latent_frames(self) -> int | None:
        """Latent frames the tokenizer can take at once (None: no limit)."""
        return None

    @abstractmethod
    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """(T', h, w) of the token grid of a (T, H, W) clip; ValueError when it does not fit."""

    @abstractmethod
    def encode(self, video: Tensor) -> Tensor:
        """Continuous pre-quantization latents (B, D, T', h, w)."""

    @abstractmethod
    def tokenize(self, video: Tensor) -> Tensor:
        """Code ids (B, T', h, w)."""

    @abstractmethod
    def detokenize(self, indices: Tensor, previous: Tensor | None = None) -> Tensor:
        """Video (B, C, T, H, W) of code ids (B, T', h, w); a tokenizer that `refines` decodes
        each frame with the one before it, starting from `previous` (B, C, H, W)."""

    @property
    def refines(self) -> bool:
        """Whether decoding reads the previous frame (see `refine`)."""
        return False

    def refine(self, coarse: Tensor, previous: Tensor) -> Tensor:
        """Frames (B, C, T, H, W) decoded with the frame before each, `previous` (B, C, T, H,
        W) (teacher-forced: the real frames); the coarse frames for a tokenizer that does not
        refine."""
        return coarse

    @abstractmethod
    def reconstruct(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction (B, C, T, H, W), code ids (B, T', h, w))."""

    @abstractmethod
    def loss(self, batch: dict[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, Tensor]]: ...


class LatentActions(ABC):
    """A latent action model: infers a discrete action per transition from unlabeled video and
    predicts the next frame from the past and that action."""

    num_actions: int
    max_frames: int

    @abstractmethod
    def infer_actions(self, video: Tensor) -> Tensor:
        """Latent action ids (B, T - 1) of the transitions of video (B, C, T, H, W)."""

    @abstractmethod
    def predict_frames(self, video: Tensor, actions: Tensor) -> Tensor:
        """Frames 1..T-1 (B, C, T - 1, H, W) predicted from the real past and `actions`."""

    @abstractmethod
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...


class WorldModel(ABC):
    """An action-conditioned generative model over a frozen tokenizer's latent frames.

    `inputs` says what its training clips hold: "tokens" (the tokenizer's code ids) or "latents"
    (the tokenizer's continuous latents, for a model with its own quantizer, which then decodes
    its own codes through `decode_pixels`). `conditioning` is "actions" (one action per frame) or
    "text" (a caption of the clip, rendered from its actions). `decodes_in_context`: the model's
    codes of a frame are decoded with the codes of the frames before it (TECO's codes hold what
    changed), so `decode_pixels` takes those as `context`.
    """

    num_actions: int
    max_frames: int
    grid: tuple[int, int]
    inputs: ClassVar[str] = "tokens"
    own_codes: ClassVar[bool] = False
    decodes_in_context: ClassVar[bool] = False
    conditioning: ClassVar[str] = "actions"

    @abstractmethod
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...

    @abstractmethod
    def new_cache(self, tokens: Tensor, actions: Tensor) -> Any:
        """A cache holding the context frames (B, T, h, w) and the actions between them."""

    @abstractmethod
    def generate_next(self, tokens: Tensor, actions: Tensor, **sampling: Any) -> Tensor:
        """The next latent frame (B, h, w) after `tokens` (B, T, h, w), `actions` (B, T)."""

    @abstractmethod
    def rollout(self, tokens: Tensor, actions: Tensor, horizon: int, **sampling: Any) -> Tensor:
        """`horizon` latent frames (B, horizon, h, w) generated after the context `tokens`."""

    def encode(self, latents: Tensor) -> Tensor:
        """Code ids (B, T, h, w) of the tokenizer's latents (only for `inputs == "latents"`)."""
        raise NotImplementedError(f"{type(self).__name__} reads token ids, not latents")

    def decode_pixels(self, tokenizer: Tokenizer, tokens: Tensor) -> Tensor:
        """Video of the model's own codes (only for `own_codes`); a model that
        `decodes_in_context` takes a third argument, `context`: the codes (B, c, h, w) of the
        frames before `tokens` (None: `tokens` start a clip)."""
        raise NotImplementedError(f"{type(self).__name__} has no codes of its own")


class TokenModel(ABC):
    """A model trained on token clips that is not itself a world model (e.g. a token critic)."""

    @abstractmethod
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...
