"""Student baseline: cross-entropy only (METHOD 9, "Student baseline")."""
from __future__ import annotations

from common.methods.base import NO_FEATURES, register_method

register_method(**{**NO_FEATURES, "name": "ce"}, summary="student baseline: cross-entropy only")
