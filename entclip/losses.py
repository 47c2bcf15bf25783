"""`entclip.losses` is a public path (DESIGN, "Public Python API"); the module lives in entclip.core.losses.

This alias makes `import entclip.losses` and `from entclip.losses import ...` give that very module."""

import sys

from entclip.core import losses as _module

sys.modules[__name__] = _module
