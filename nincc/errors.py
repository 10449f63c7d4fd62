"""One error tree for everything nincc reports to a user.

Every error carries a one-line message that says where (file:line:col, layer, blob), what was
received and what is allowed. The CLI prints ``nincc: error: <message>`` and exits non-zero.
"""

from __future__ import annotations


class NinccError(Exception):
    """Base of all errors nincc raises on bad input."""


class PrototxtError(NinccError):
    """A prototxt (net or solver text) that does not parse; message names file:line:col."""

    def __init__(self, message: str, path: str = "<string>", line: int = 0, col: int = 0):
        self.path, self.line, self.col, self.detail = path, line, col, message
        where = f"{path}:{line}:{col}" if line else path
        super().__init__(f"{where}: {message}")


class UpgradeError(NinccError):
    """A legacy file Caffe's upgrade pass would refuse (e.g. mixed `layer` and `layers`)."""


class UnsupportedLayerError(NinccError):
    """A layer type that is not in the table (Python layers, forks' layers)."""


class GraphError(NinccError):
    """A net whose structure is wrong: missing bottom, top produced twice, cycle, empty phase."""


class ShapeError(NinccError):
    """Shapes that do not fit a layer (Concat of unequal sizes, kernel larger than input, ...)."""


class WeightsError(NinccError):
    """A weights file that cannot be read or does not fit the net."""


class InputError(NinccError):
    """Arrays fed to a compiled net that do not fit its inputs."""


class SolverError(NinccError):
    """A solver definition nincc cannot run (unknown type or lr_policy, no net)."""


class DataError(NinccError):
    """A data source that is missing, empty or unreadable."""
