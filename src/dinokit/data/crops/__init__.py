"""Attention-guided localisation: pseudo ground-truth boxes (:mod:`.boxes`, :mod:`.sam`),
``LocalizedRandomResizedCrop`` (:mod:`.localized`) and attention-density crops (:mod:`.density`).

Boxes are ``[x, y, w, h]`` pixels of the original image; a crop is ``(top, left, height, width)``. See
docs/methods/localisation.md.
"""

from .boxes import *  # noqa: F403
from .density import *  # noqa: F403
from .localized import *  # noqa: F403
from .sam import *  # noqa: F403
