"""`entclip.theory` is a public path (DESIGN, "Public Python API"); the module lives in entclip.core.theory.

This alias makes `import entclip.theory` and `from entclip.theory import ...` give that very module."""

import sys

from entclip.core import theory as _module

sys.modules[__name__] = _module
