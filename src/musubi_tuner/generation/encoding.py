"""What prompt-embedding caches key images by."""

from __future__ import annotations

import hashlib

from PIL import Image


def image_key(image: Image.Image) -> tuple:
    """What identifies an image's content in the embedding caches. Not id(): a freed image's id is reused by the next
    one, which then got the cached embedding of another picture (the judge's edit scores changed between runs)."""
    return image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest()
