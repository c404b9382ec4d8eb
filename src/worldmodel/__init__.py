"""worldmodel: generative interactive environments trained from video.

Parts: a video tokenizer, a latent action model and a MaskGIT dynamics model (Genie), plus the
related systems as variants of the same parts; one training loop; one evaluation harness.
"""

__version__ = "0.1.0"
