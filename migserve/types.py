"""Type aliases shared across the project."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
F32Array = npt.NDArray[np.float32]
